"""Issue 12, items 1 and 2: a compromised hub cannot ship what the targets key holder did not sign.

Real hub and agent processes, real CLI. The attacker holds the admin identity (its key lives on
the hub) or can write the hub's disk with only the online snapshot/timestamp keys; the key
holder runs the routine `publish --targets-key` / `sign`. Whatever the attacker staged or
planted must never come out signed, and agents never install it.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, TargetFile

from modelfleet.hub.signing import load_signer
from tests.procs import ROOT, HubProcess, enroll_agent, wait_for
from tests.test_fleet import active, fleet, model_error  # noqa: F401  (fixture)


def _keys_init_offline(tmp_path: Path) -> Path:
    offline = tmp_path / "offline-keys"
    cmd = ["keys", "init", "--offline", str(offline)]
    subprocess.run(
        [sys.executable, "-m", "modelfleet.hub.cli", "--data", str(tmp_path / "hub"), *cmd],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    return offline / "targets.pem"


def _signed_targets(hub: HubProcess) -> dict:
    tuf = hub.data / "tuf"
    ts = json.loads((tuf / "timestamp.json").read_bytes())
    snap_v = ts["signed"]["meta"]["snapshot.json"]["version"]
    snap = json.loads((tuf / f"{snap_v}.snapshot.json").read_bytes())
    targets_v = snap["signed"]["meta"]["targets.json"]["version"]
    return json.loads((tuf / f"{targets_v}.targets.json").read_bytes())["signed"]["targets"]


def _refused_start(hub: HubProcess) -> str:
    """Start a hub on ``hub``'s data that must refuse to start; return what it printed."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelfleet.hub.cli",
            "--data",
            str(hub.data),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--enroll-listen",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    return r.stdout + r.stderr


def _versions(hub: HubProcess) -> dict[int, str]:
    """{version: 'yes'/'NO'} from `models versions`."""
    out = {}
    for line in hub.cli("models", "versions", "mlp").splitlines()[1:]:
        cols = line.split()
        out[int(cols[0])] = cols[2]
    return out


def test_blind_signing_of_an_attackers_staged_version(fleet, tmp_path: Path) -> None:  # noqa: F811
    targets_key = _keys_init_offline(tmp_path)
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)), "--targets-key", str(targets_key))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    # The attacker, holding only the admin identity, uploads a model of their own.
    evil = hub.cli("publish", "mlp", str(fleet.model(66)), check=False)
    assert evil.returncode == 7 and "NOT signed" in evil.stderr
    # The key holder's routine publish signs their version and nothing else.
    out = hub.cli("publish", "mlp", str(fleet.model(1)), "--targets-key", str(targets_key))
    assert "published mlp v3" in out and "signed" in out
    assert _versions(hub) == {1: "yes", 2: "NO", 3: "yes"}
    assert "mlp/2/bundle.tar" not in _signed_targets(hub)
    refused = hub.cli("deploy", "mlp", "2", check=False)
    assert refused.returncode == 7 and "not signed" in refused.stderr
    hub.cli("deploy", "mlp", "3")
    wait_for(lambda: active(agent) == 3, 60, "v3")
    # `sign` needs the digest the key holder means: the attacker's v2 under another digest is
    # refused, nothing signed.
    wrong = hub.cli(
        "sign", "mlp", "2", "--targets-key", str(targets_key), "--sha256", "ab" * 32, check=False
    )
    assert wrong.returncode == 9 and "refusing to sign" in wrong.stderr
    assert "you built sha256" in wrong.stderr
    assert "mlp/2/bundle.tar" not in _signed_targets(hub)


def test_signing_a_later_version_with_sign_and_its_digest(fleet, tmp_path: Path) -> None:  # noqa: F811
    targets_key = _keys_init_offline(tmp_path)
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    unsigned = hub.cli("publish", "mlp", str(fleet.model(0)), check=False)
    digest = re.search(r"--sha256 ([0-9a-f]{64})", unsigned.stderr)
    assert unsigned.returncode == 7 and digest, unsigned.stderr
    assert "signed mlp v1" in hub.cli(
        "sign", "mlp", "1", "--targets-key", str(targets_key), "--sha256", digest.group(1)
    )
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1 signed later with `sign`")


def _current(hub: HubProcess) -> tuple[Metadata, Metadata, int]:
    """timestamp, snapshot and the targets version they name, as on the hub's disk."""
    tuf = hub.data / "tuf"
    ts = Metadata.from_bytes((tuf / "timestamp.json").read_bytes())
    snap_name = f"{ts.signed.snapshot_meta.version}.snapshot.json"
    snap = Metadata.from_bytes((tuf / snap_name).read_bytes())
    return ts, snap, snap.signed.meta["targets.json"].version


def _point_snapshot_at(hub: HubProcess, targets_version: int, targets_bytes: bytes) -> None:
    """What the online keys (on the hub's disk) allow: a new snapshot naming any targets file,
    and a timestamp naming that snapshot, both signed with the real keys."""
    tuf = hub.data / "tuf"
    ts, snap, _ = _current(hub)
    snap.signed.version += 1
    snap.signed.meta["targets.json"] = MetaFile(
        targets_version, len(targets_bytes), {"sha256": hashlib.sha256(targets_bytes).hexdigest()}
    )
    snap.sign(load_signer(hub.data / "keys" / "snapshot.pem"), append=False)
    sbytes = snap.to_bytes()
    (tuf / f"{snap.signed.version}.snapshot.json").write_bytes(sbytes)
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile(
        snap.signed.version, len(sbytes), {"sha256": hashlib.sha256(sbytes).hexdigest()}
    )
    ts.sign(load_signer(hub.data / "keys" / "timestamp.pem"), append=False)
    (tuf / "timestamp.json").write_bytes(ts.to_bytes())


def _forge_targets(hub: HubProcess, path: str, evil_sha256: str) -> None:
    """A new targets file (signed by a key of the attacker's own) that re-points a published
    version, made to look complete with snapshot and timestamp signed by the real online keys."""
    tuf = hub.data / "tuf"
    _, _, tv = _current(hub)
    targets = Metadata.from_bytes((tuf / f"{tv}.targets.json").read_bytes())
    old = targets.signed.targets[path]
    targets.signed.targets[path] = TargetFile(
        old.length, {"sha256": evil_sha256}, path, old.unrecognized_fields
    )
    targets.signed.version += 1
    targets.sign(CryptoSigner.generate_ed25519(), append=False)
    tbytes = targets.to_bytes()
    (tuf / f"{targets.signed.version}.targets.json").write_bytes(tbytes)
    _point_snapshot_at(hub, targets.signed.version, tbytes)


@pytest.mark.parametrize("layout", ["offline", "online"])
def test_hub_refuses_forged_metadata_on_its_disk(fleet, tmp_path: Path, layout: str) -> None:  # noqa: F811
    targets_key = _keys_init_offline(tmp_path) if layout == "offline" else None
    key_args = ["--targets-key", str(targets_key)] if targets_key else []
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)), *key_args)
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    published = _signed_targets(hub)["mlp/1/bundle.tar"]["hashes"]["sha256"]
    _forge_targets(hub, "mlp/1/bundle.tar", "66" * 32)
    # The key holder's next publish is refused before anything is staged or signed.
    refused = hub.cli("publish", "mlp", str(fleet.model(1)), *key_args, check=False)
    assert refused.returncode == 7, refused.stderr
    assert "not signed by the targets key" in refused.stderr
    wait_for(lambda: "REFUSING the TUF metadata" in hub.logs(), 10, "the hub says why")
    # The refresher does not re-sign on top of the forged files either; the forged targets
    # file stays the newest on disk, unreferenced by anything the hub signs afterwards.
    assert _versions(hub) == {1: "yes"}
    # A new agent cannot be handed the forged state: enrollment (which hands out root.json)
    # refuses while it is there.
    with pytest.raises(AssertionError, match="enroll failed"):
        enroll_agent(hub, tmp_path / "edge-2", "site=berlin", hostname="edge-2")
    # The running agent keeps serving the verified v1.
    assert active(agent) == 1
    # A restarted hub refuses to start on forged metadata, naming the file.
    hub.stop()
    output = _refused_start(hub)
    assert "targets.json is not signed by the targets key" in output
    assert published != "66" * 32


def test_a_rolled_back_targets_is_refused_after_a_hub_restart(fleet, tmp_path: Path) -> None:  # noqa: F811
    """With only the online keys, point the snapshot back at an older (validly signed) targets:
    a running hub refuses it at once, a restarted one refuses to start (the registry remembers
    the newest targets it served), so the key holder is never offered the old base."""
    targets_key = _keys_init_offline(tmp_path)
    hub = fleet.hub()
    hub.cli("publish", "mlp", str(fleet.model(0)), "--targets-key", str(targets_key))
    hub.cli("publish", "mlp", str(fleet.model(1)), "--targets-key", str(targets_key))
    _, _, current = _current(hub)
    older = (hub.data / "tuf" / f"{current - 1}.targets.json").read_bytes()
    _point_snapshot_at(hub, current - 1, older)
    refused = hub.cli(
        "publish", "mlp", str(fleet.model(2)), "--targets-key", str(targets_key), check=False
    )
    assert refused.returncode == 7 and "rollback" in refused.stderr
    hub.stop()
    output = _refused_start(hub)
    assert f"this hub already served targets v{current}" in output
