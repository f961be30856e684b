"""Disaster recovery: `modelfleet-hub backup` of a running hub and `restore` on a fresh machine.

The unit tests drive a real HubCore in this process (SQLite, DuckDB, TUF, CA on disk): what the
backup holds, that it is one instant while publishes go on, and every refusal of restore. The
process tests run the real hub, agent and CLI: back up while serving, destroy the hub's data,
restore, the agent reconnects and keeps its version, a new publish verifies on it; the same
after versions were published (and lost) after the backup; and a backup killed half-way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from modelfleet.agent.fleet.verify import BundleVerifier, InMemoryTransport
from modelfleet.hub.backup import (
    MANIFEST_FILE,
    RESTORED_FILE,
    VERSION_GAP,
    BackupError,
    BackupFile,
    BackupSummary,
    BackupWriter,
    check_path,
    restore,
)
from modelfleet.hub.config import HubConfig
from modelfleet.hub.core import LOCK_FILE, HubCore, HubRunningError
from modelfleet.hub.registry import FailedPreconditionError
from modelfleet.hub.signing import TufRepository, init_keys
from modelfleet.kernel.atomic import try_lock
from modelfleet.kernel.bundle import bundle_target_path, create_bundle, pack_bundle
from modelfleet.kernel.errors import InvalidRequestError, VerificationError
from modelfleet.kernel.reports import AgentReport, ModelReport
from tests import models
from tests.conftest import mlp_samples
from tests.procs import ROOT, HubProcess, agent_status, wait_for
from tests.test_fleet import active, agents_ls, fleet, infer_version  # noqa: F401  (fixture)

# ---------------------------------------------------------------------------------------------
# A real hub core in this process


def make_core(data: Path) -> HubCore:
    return HubCore(HubConfig(data=data))


def close(core: HubCore) -> None:
    core.telemetry_ingest.close()
    core.registry.close()


def archive(tmp: Path, name: str, version: int, seed: int) -> tuple[Path, str, int]:
    """A real bundle archive; the same arguments give the same file."""
    path = tmp / "archives" / f"{name}-{version}-{seed}.tar"
    if path.exists():
        data = path.read_bytes()
        return path, hashlib.sha256(data).hexdigest(), len(data)
    model = models.mlp(tmp / "onnx" / f"{name}-{version}-{seed}.onnx", seed=seed)
    bundle = create_bundle(
        model,
        name=name,
        version=version,
        samples=mlp_samples(),
        out_dir=tmp / "bundles" / f"{name}-{version}-{seed}",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    digest, size = pack_bundle(bundle.path, path)
    return path, digest, size


def publish(core: HubCore, tmp: Path, name: str, version: int, seed: int = 0) -> str:
    """What HubAdmin.Publish does with an upload; returns the archive's sha256."""
    path, digest, size = archive(tmp, name, version, seed)
    header = {"name": name, "version": version, "size": size, "sha256": digest}
    core.admit_upload(header)
    upload = core.new_upload()
    shutil.copyfile(path, upload)
    core.register_upload(header, core.verify_upload(header, upload))
    return digest


async def _write(items, dest: Path) -> str:
    writer = BackupWriter(dest)
    summary = None
    async for item in items:
        if isinstance(item, BackupFile):
            writer.begin(item)
        elif isinstance(item, BackupSummary):
            summary = item
        else:
            writer.write(item)
    assert summary is not None
    return writer.finish(summary)


def take_backup(core: HubCore, dest: Path) -> str:
    """What `modelfleet-hub backup` does, without the gRPC in between: the manifest's sha256."""
    return asyncio.run(_write(core.backup(), dest))


@pytest.fixture
def hub_core(tmp_path: Path):
    core = make_core(tmp_path / "hub")
    yield core
    close(core)


@pytest.fixture
def backup(tmp_path: Path, hub_core: HubCore) -> Path:
    publish(hub_core, tmp_path, "mlp", 1)
    publish(hub_core, tmp_path, "mlp", 2, seed=1)
    take_backup(hub_core, tmp_path / "backup")
    return tmp_path / "backup"


def manifest_of(backup: Path) -> dict:
    return json.loads((backup / MANIFEST_FILE).read_text())


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# What a backup holds, and a restored hub


def test_restore_brings_back_every_store_with_private_modes(
    tmp_path: Path, hub_core: HubCore, backup: Path
) -> None:
    data = hub_core.paths.root
    manifest = manifest_of(backup)
    listed = {f["path"] for f in manifest["files"]}
    # Registry, telemetry, every TUF file, the online keys, the CA, both blobs.
    assert {"registry.db", "telemetry.duckdb", "ca/ca.key", "ca/ca.crt"} <= listed
    assert {p for p in tree(data / "tuf") if not p.startswith(".")} == {
        p.removeprefix("tuf/") for p in listed if p.startswith("tuf/")
    }
    assert {"keys/snapshot.pem", "keys/timestamp.pem", "keys/root.pem", "keys/targets.pem"} <= (
        listed
    )
    assert len([p for p in listed if p.startswith("blobs/")]) == 2
    assert manifest["versions"] == 2 and manifest["tuf_versions"]["targets"] == 3
    # Nothing of a backup may be read by others: it holds the CA and signing keys.
    for p in [backup, *backup.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    # The staging copy in the hub's uploads/ is gone once the backup was sent.
    assert list(hub_core.paths.uploads.iterdir()) == []

    result = restore(backup, tmp_path / "new")
    new = tmp_path / "new"
    assert result.data_dir == new and result.replaced is None and result.targets_key_online
    for rel in ("keys", "ca", "blobs"):
        assert tree(new / rel) == tree(data / rel)
    for p in [new, *new.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    db = sqlite3.connect(new / "registry.db")
    assert db.execute("SELECT name, version FROM versions ORDER BY version").fetchall() == [
        ("mlp", 1),
        ("mlp", 2),
    ]
    db.close()
    with duckdb.connect(str(new / "telemetry.duckdb"), read_only=True) as tel:
        assert {r[0] for r in tel.execute("SHOW TABLES").fetchall()} >= {
            "reports",
            "version_stats",
        }
    assert json.loads((new / RESTORED_FILE).read_text())["version_gap"] == VERSION_GAP

    # The restored hub starts as the same hub, with its TUF versions moved up once.
    before = hub_core.tuf.versions()
    core = make_core(new)
    try:
        after = core.tuf.versions()
        assert after["root"] == before["root"]
        for role in ("targets", "snapshot", "timestamp"):
            assert after[role] == before[role] + VERSION_GAP, role
        assert not (new / RESTORED_FILE).exists()
        assert [v.version for v in core.versions("mlp")] == [1, 2]
        assert core.ca.fingerprint == hub_core.ca.fingerprint
        publish(core, tmp_path, "mlp", 3, seed=2)
    finally:
        close(core)
    core = make_core(new)  # a second start does not move them again
    try:
        assert core.tuf.versions()["snapshot"] == after["snapshot"] + 1
    finally:
        close(core)


def test_backup_is_one_instant_while_the_hub_keeps_publishing(
    tmp_path: Path, hub_core: HubCore
) -> None:
    publish(hub_core, tmp_path, "mlp", 1)

    async def race() -> str:
        items = hub_core.backup()
        first = await items.__anext__()  # the snapshot is taken: the stream has begun
        # The hub goes on serving: a publish lands while the backup is being sent.
        publish(hub_core, tmp_path, "mlp", 2, seed=1)

        async def rest():
            yield first
            async for item in items:
                yield item

        return await _write(rest(), tmp_path / "backup")

    asyncio.run(race())
    files = {f["path"] for f in manifest_of(tmp_path / "backup")["files"]}
    assert len([p for p in files if p.startswith("blobs/")]) == 1
    assert "tuf/3.targets.json" not in files  # v2's targets came after the snapshot
    restore(tmp_path / "backup", tmp_path / "new")
    # Registry and metadata agree (the hub refuses to start otherwise: a rollback).
    core = make_core(tmp_path / "new")
    try:
        assert [v.version for v in core.versions("mlp")] == [1]
        assert core.tuf.target(bundle_target_path("mlp", 2)) is None
    finally:
        close(core)


def test_a_restored_hub_is_accepted_by_agents_that_saw_newer_metadata(tmp_path: Path) -> None:
    """The hub signed more after the backup, and agents saw it; then the hub was lost."""
    init_keys(tmp_path / "keys")
    repo = TufRepository.create(tmp_path / "tuf", tmp_path / "keys")
    blobs: dict[str, bytes] = {}

    def add(repo: TufRepository, version: int, seed: int) -> None:
        path, digest, size = archive(tmp_path, "mlp", version, seed)
        custom = {"name": "mlp", "version": version, "manifest_sha256": "ab" * 32}
        repo.add_target(bundle_target_path("mlp", version), size, digest, custom)
        blobs[digest] = path.read_bytes()

    add(repo, 1, 0)
    repo.copy_metadata(tmp_path / "backup" / "tuf")  # the backup
    add(repo, 2, 1)  # lost with the hub, but the agent fetched it
    serving = [repo]  # the hub the agent reaches
    agent = BundleVerifier(
        tmp_path / "agent" / "tuf",
        tmp_path / "agent" / "cache",
        InMemoryTransport(lambda name: serving[0].read(name), blobs),
        trusted_root=repo.root_bytes(),
    )
    agent.fetch_bundle("mlp", 2)

    def restored(name: str) -> TufRepository:
        shutil.copytree(tmp_path / "backup" / "tuf", tmp_path / name)
        return TufRepository.open(tmp_path / name, tmp_path / "keys")

    # Without moving the versions up, the restored hub's next publish reuses version numbers
    # the agent already trusts with other contents: it is refused.
    plain = restored("plain")
    add(plain, 3, 2)
    serving[0] = plain
    with pytest.raises(VerificationError, match="not signed"):
        agent.fetch_bundle("mlp", 3)  # it keeps the lost hub's timestamp, of the same version

    moved = restored("moved")
    assert moved.advance_versions(VERSION_GAP)["timestamp"][1] > VERSION_GAP
    add(moved, 3, 2)
    serving[0] = moved
    assert agent.fetch_bundle("mlp", 3).name == "3"


def test_publish_refuses_a_version_number_agents_hold_but_the_registry_lost(
    tmp_path: Path, hub_core: HubCore
) -> None:
    publish(hub_core, tmp_path, "mlp", 1)
    hub_core.registry.add_agent("edge-1-abc", "edge-1", {}, "fp")
    report = AgentReport(models=(ModelReport("mlp", active_version=2, previous_version=1),))
    hub_core.registry.touch("edge-1-abc", report)
    with pytest.raises(FailedPreconditionError) as info:
        publish(hub_core, tmp_path, "mlp", 2, seed=1)
    assert "edge-1" in str(info.value) and "--version 3" in str(info.value)
    publish(hub_core, tmp_path, "mlp", 3, seed=1)
    publish(hub_core, tmp_path, "other", 2, seed=1)  # another model's numbers are free


# ---------------------------------------------------------------------------------------------
# Refusals: tampered, partial, forged manifests, occupied targets


@pytest.mark.parametrize(
    "victim", ["tuf/1.root.json", "keys/snapshot.pem", "registry.db", "ca/ca.key", "blob"]
)
def test_a_tampered_file_is_refused_naming_it(tmp_path: Path, backup: Path, victim: str) -> None:
    if victim == "blob":
        victim = next(f["path"] for f in manifest_of(backup)["files"] if "blobs/" in f["path"])
    path = backup / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as info:
        restore(backup, tmp_path / "new")
    assert f"{victim} does not match the manifest" in str(info.value)
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if "restoring" in p.name] == []


def test_a_missing_or_swapped_file_is_refused(tmp_path: Path, backup: Path) -> None:
    (backup / "keys" / "timestamp.pem").unlink()
    with pytest.raises(VerificationError, match=r"keys/timestamp\.pem is missing"):
        restore(backup, tmp_path / "new")
    # A symlink to a file with the right bytes is not the backup's own file.
    outside = tmp_path / "elsewhere.pem"
    outside.write_bytes((tmp_path / "hub" / "keys" / "timestamp.pem").read_bytes())
    (backup / "keys" / "timestamp.pem").symlink_to(outside)
    with pytest.raises(VerificationError, match=r"keys/timestamp\.pem"):
        restore(backup, tmp_path / "new")


def test_an_unfinished_backup_is_never_taken_for_a_complete_one(
    tmp_path: Path, hub_core: HubCore
) -> None:
    publish(hub_core, tmp_path, "mlp", 1)

    async def cut_short() -> None:
        writer = BackupWriter(tmp_path / "partial")
        async for item in hub_core.backup():
            if isinstance(item, BackupFile):
                if item.path.startswith("tuf/"):
                    return  # killed here: files written, no manifest
                writer.begin(item)
            elif isinstance(item, bytes):
                writer.write(item)

    asyncio.run(cut_short())
    assert (tmp_path / "partial" / "registry.db").exists()
    with pytest.raises(VerificationError, match="never finished"):
        restore(tmp_path / "partial", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # And a new backup will not mix into it.
    with pytest.raises(BackupError, match="interrupted backup"):
        BackupWriter(tmp_path / "partial")


def test_a_damaged_transfer_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    writer = BackupWriter(tmp_path / "b")
    writer.begin(BackupFile("registry.db", 4, hashlib.sha256(b"good").hexdigest()))
    writer.write(b"evil")
    with pytest.raises(VerificationError, match=r"registry\.db arrived as 4 bytes"):
        writer.finish(BackupSummary(0.0, "", {}, 0, 0, 0, 0, 1, 4, 0.0))
    writer.abort()
    assert not (tmp_path / "b").exists()
    writer = BackupWriter(tmp_path / "b")
    with pytest.raises(InvalidRequestError):
        writer.begin(BackupFile("../outside", 1, "0" * 64))
    writer.begin(BackupFile("registry.db", 1, "0" * 64))
    with pytest.raises(BackupError, match="more than the 1 bytes"):
        writer.write(b"ab")


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "/etc/passwd",
        "tuf/../../x",
        "tuf//x",
        "hub.lock",
        "registry.db/x",
        "keys",
        "blobs/sha256/aa/" + "bb" * 32,
        "blobs/sha256/aa/short",
        "tuf\\x",
    ],
)
def test_paths_outside_the_layout_are_refused(path: str) -> None:
    with pytest.raises(InvalidRequestError):
        check_path(path)


def test_paths_of_the_layout_are_accepted() -> None:
    for path in ("registry.db", "tuf/3.targets.json", "tuf/staged/targets.json", "mqtt/x.pem"):
        check_path(path)
    check_path("blobs/sha256/ab/ab" + "0" * 62)


def _rewrite_manifest(backup: Path, change) -> None:
    manifest = manifest_of(backup)
    change(manifest)
    (backup / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_forged_manifest_is_refused(tmp_path: Path, hub_core: HubCore) -> None:
    publish(hub_core, tmp_path, "mlp", 1)
    digest = take_backup(hub_core, tmp_path / "backup")
    backup = tmp_path / "backup"
    # A path that leaves the folder, even with the right hash.
    (tmp_path / "victim").write_bytes(b"x")
    _rewrite_manifest(
        backup,
        lambda m: m["files"].append(
            {"path": "../victim", "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
        ),
    )
    with pytest.raises(VerificationError, match="not a path a hub backup holds"):
        restore(backup, tmp_path / "new")
    # A file changed together with its manifest entry: caught by the printed manifest hash.
    (backup / "ca" / "ca.crt").write_bytes(b"forged")
    _rewrite_manifest(backup, lambda m: m["files"].pop())

    def forge(m: dict) -> None:
        for f in m["files"]:
            if f["path"] == "ca/ca.crt":
                f.update(size=6, sha256=hashlib.sha256(b"forged").hexdigest())

    _rewrite_manifest(backup, forge)
    with pytest.raises(VerificationError, match=r"not the .* that backup printed"):
        restore(backup, tmp_path / "new", expect_sha256=digest)
    _rewrite_manifest(backup, lambda m: m.update(format="something-else"))
    with pytest.raises(VerificationError, match="not a valid backup manifest"):
        restore(backup, tmp_path / "new")
    _rewrite_manifest(
        backup,
        lambda m: m.update(
            format="modelfleet-hub-backup",
            files=[f for f in m["files"] if f["path"] != "registry.db"],
        ),
    )
    with pytest.raises(VerificationError, match=r"lists no registry\.db"):
        restore(backup, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_restore_never_overwrites_without_force_nor_under_a_running_hub(
    tmp_path: Path, backup: Path
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "registry.db").write_bytes(b"the current hub")
    with pytest.raises(BackupError, match=r"is not empty .* pass --force"):
        restore(backup, target)
    assert tree(target) == {"registry.db": b"the current hub"}
    lock = try_lock(target / LOCK_FILE)
    assert lock is not None
    try:
        with pytest.raises(HubRunningError, match="stop it"):
            restore(backup, target, force=True)
    finally:
        os.close(lock)
    assert (target / "registry.db").read_bytes() == b"the current hub"
    result = restore(backup, target, force=True)
    assert result.replaced is not None
    assert (result.replaced / "registry.db").read_bytes() == b"the current hub"
    assert (target / "registry.db").read_bytes() == (backup / "registry.db").read_bytes()
    # An empty folder is no obstacle; the backup's own folder is.
    (tmp_path / "empty").mkdir()
    restore(backup, tmp_path / "empty")
    with pytest.raises(InvalidRequestError, match="overlap"):
        restore(backup, backup / "inside")


# ---------------------------------------------------------------------------------------------
# Real processes: hub, agent, CLI


def hub_cli(data: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelfleet.hub.cli", "--data", str(data), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def restart_on(fleet, old: HubProcess, data: Path) -> HubProcess:  # noqa: F811
    """A hub on ``data`` at the old hub's addresses: the "fresh machine" agents know."""
    hub = HubProcess(data, log_path=data.parent / f"hub-restored-{len(fleet.hubs)}.log")
    hub.port, hub.enroll_port, hub.url = old.port, old.enroll_port, old.url
    fleet.hubs.append(hub)
    return hub.start()


def test_backup_destroy_restore_end_to_end(fleet, tmp_path: Path) -> None:  # noqa: F811
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1 on the agent")

    out = hub.cli("backup", str(tmp_path / "backup"))
    assert f"into {tmp_path / 'backup'}" in out and "1 agent(s)" in out
    digest = out.split("manifest sha256 ")[1].split(":")[0]
    assert digest == hashlib.sha256((tmp_path / "backup" / MANIFEST_FILE).read_bytes()).hexdigest()
    assert list((hub.data / "uploads").iterdir()) == []

    # A tampered copy is refused, naming the file, and nothing is written.
    shutil.copytree(tmp_path / "backup", tmp_path / "tampered")
    key = tmp_path / "tampered" / "keys" / "timestamp.pem"
    key.write_bytes(key.read_bytes().replace(b"A", b"B", 1))
    r = hub_cli(
        tmp_path / "x", "restore", str(tmp_path / "tampered"), "--data-dir", str(tmp_path / "t")
    )
    assert r.returncode == 9, r.stderr
    assert "keys/timestamp.pem does not match the manifest" in r.stderr
    assert not (tmp_path / "t").exists()

    # Disaster: the hub and its data are gone. The agent keeps serving meanwhile.
    hub.kill()
    shutil.rmtree(hub.data)
    assert infer_version(agent) == "1"
    new = tmp_path / "new-machine" / "hub-data"
    r = hub_cli(
        new,
        "restore",
        str(tmp_path / "backup"),
        "--data-dir",
        str(new),
        "--manifest-sha256",
        digest,
    )
    assert r.returncode == 0, r.stderr
    assert "manifest verified" in r.stdout
    for p in (new / "keys" / "snapshot.pem", new / "ca" / "ca.key", new / "admin" / "admin.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    # Over a hub that now has data: refused without --force.
    again = hub_cli(new, "restore", str(tmp_path / "backup"), "--data-dir", str(new))
    assert again.returncode == 7 and "--force" in again.stderr

    restored = restart_on(fleet, hub, new)
    assert "restored from the backup taken at" in restored.logs()
    # The agent reconnects with its old certificate (same CA) and keeps its version.
    started = time.time()
    wait_for(lambda: agents_ls(restored)["edge-1"]["last_seen"] > started, 60, "reconnected")
    assert active(agent) == 1 and infer_version(agent) == "1"
    # A new publish is signed by the restored hub and verified by the agent.
    restored.cli("publish", "mlp", str(fleet.model(1)))
    restored.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 60, "v2 verified and active on the agent")
    assert "fetched and verified mlp v2" in agent.logs()


def test_restore_after_versions_published_and_lost_with_the_hub(fleet, tmp_path: Path) -> None:  # noqa: F811
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    hub.cli("backup", str(tmp_path / "backup"))
    # After the backup: v2 is published and reaches the agent, which now trusts newer TUF
    # metadata than the backup holds. Then the hub is lost.
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 60, "v2")
    hub.kill()
    shutil.rmtree(hub.data)

    new = tmp_path / "new"
    assert hub_cli(new, "restore", str(tmp_path / "backup"), "--data-dir", str(new)).returncode == 0
    restored = restart_on(fleet, hub, new)
    # The restored desired state is v1: the agent switches back (v1 is still loaded).
    wait_for(lambda: active(agent) == 1, 60, "back on v1, as the backup says")
    wait_for(
        lambda: agent_status(agent.admin_socket)["mlp"].get("previous_version") == "2", 30, "v2"
    )
    wait_for(
        lambda: any(
            m.get("previous_version") == "2"
            for m in agents_ls(restored)["edge-1"]["report"]["models"]
        ),
        30,
        "the agent's report of v2",
    )
    # v2 is lost with the old hub but the agent holds it: the number cannot be reused.
    refused = restored.cli("publish", "mlp", str(fleet.model(2)), check=False)
    assert refused.returncode == 7, refused.stderr
    assert "--version 3" in refused.stderr
    restored.cli("publish", "mlp", str(fleet.model(2)), "--version", "3")
    restored.cli("deploy", "mlp", "3")
    # Verified against metadata newer than any the lost hub signed.
    wait_for(lambda: active(agent) == 3, 60, "v3 verified and active on the agent")
    assert infer_version(agent) == "3"


def test_a_backup_killed_half_way_is_refused(fleet, tmp_path: Path) -> None:  # noqa: F811
    # 0.2 MB/s: the bundle of about 1 MB takes seconds to send, time to kill the CLI in it.
    hub = fleet.hub("--transfer-rate-limit-mbps", "0.2")
    big = models.mlp(tmp_path / "onnx" / "big.onnx", inputs=256, hidden=1024)
    hub.cli("publish", "mlp", str(big))
    dest = tmp_path / "backup"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfleet.hub.cli", "--data", str(hub.data), "backup", str(dest)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: (dest / "registry.db").exists(), 30, "the backup under way")
        wait_for(lambda: any(dest.glob("blobs/sha256/*/*")), 30, "the blob under way")
        assert proc.poll() is None, "the backup finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    assert not (dest / MANIFEST_FILE).exists()
    r = hub_cli(hub.data, "restore", str(dest), "--data-dir", str(tmp_path / "new"))
    assert r.returncode == 9 and "never finished" in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()
    r = hub_cli(hub.data, "backup", str(dest))
    assert r.returncode == 7 and "interrupted backup" in r.stderr, r.stderr
    # The hub noticed the client went away and removed its staging copy.
    wait_for(lambda: list((hub.data / "uploads").iterdir()) == [], 30, "staging removed")


def test_the_telemetry_file_name_is_the_stores() -> None:
    from modelfleet.hub.backup import TELEMETRY_FILE
    from modelfleet.hub.telemetry import TELEMETRY_FILE as STORE_FILE

    assert TELEMETRY_FILE == STORE_FILE


def test_alert_rules_webhooks_and_queued_notifications_are_backed_up(
    tmp_path: Path, hub_core: HubCore
) -> None:
    from modelfleet.hub.alert_manager import ALERTS_FILE, AlertStore
    from modelfleet.hub.alerts import Rule

    live = AlertStore(hub_core.paths.root / ALERTS_FILE)
    try:
        live.add_webhook("ops", "https://hooks.example/x", b"s" * 32)
        live.set_rule(Rule("fraud-errors", "error_rate", ">", 0.02, model="fraud"))
        # Taken while the store is open and written, as in a running hub.
        take_backup(hub_core, tmp_path / "backup")
    finally:
        live.close()
    assert ALERTS_FILE in {f["path"] for f in manifest_of(tmp_path / "backup")["files"]}
    restore(tmp_path / "backup", tmp_path / "new")
    assert stat.S_IMODE((tmp_path / "new" / ALERTS_FILE).stat().st_mode) == 0o600
    restored = AlertStore(tmp_path / "new" / ALERTS_FILE)
    try:
        assert [w.name for w in restored.webhooks()] == ["ops"]
        assert [r.name for r in restored.stored_rules()] == ["fraud-errors"]
    finally:
        restored.close()


def test_a_backup_from_before_alerting_restores_without_alerts(
    tmp_path: Path, hub_core: HubCore, backup: Path
) -> None:
    assert "alerts.sqlite" not in {f["path"] for f in manifest_of(backup)["files"]}
    restore(backup, tmp_path / "new")
    assert not (tmp_path / "new" / "alerts.sqlite").exists()
