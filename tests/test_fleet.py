"""Hub and agents as real processes: enrollment, signed distribution, refusals, restarts."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf.json_format import MessageToDict

from modelfleet.kernel.identity import generate_key, load_certificate, make_csr
from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc
from tests import models
from tests.procs import (
    ROOT,
    AgentProcess,
    HubProcess,
    agent_status,
    enroll_agent,
    hub_admin,
    wait_for,
)

# Tests restart hubs on purpose; agents should come back within seconds, not the default 30.
FAST_BACKOFF = {"MODELFLEET_AGENT_BACKOFF_MAX_S": "1", "MODELFLEET_AGENT_REPORT_INTERVAL_S": "1"}


@pytest.fixture
def fleet(tmp_path: Path):
    class Fleet:
        def __init__(self) -> None:
            self.hubs: list[HubProcess] = []
            self.agents: list[AgentProcess] = []
            self.onnx: dict[int, Path] = {}

        def hub(self, *extra: str) -> HubProcess:
            h = HubProcess(tmp_path / "hub", *extra, log_path=tmp_path / f"hub{len(self.hubs)}.log")
            self.hubs.append(h)
            return h.start()

        def restart_hub(self, old: HubProcess, *extra: str) -> HubProcess:
            old.stop()
            h = HubProcess(old.data, *extra, log_path=tmp_path / f"hub{len(self.hubs)}.log")
            h.port, h.enroll_port, h.url = old.port, old.enroll_port, old.url
            self.hubs.append(h)
            return h.start()

        def agent(
            self, hub: HubProcess, name: str, labels: str, *extra: str, env: dict | None = None
        ) -> AgentProcess:
            data = tmp_path / name
            config = enroll_agent(hub, data, labels, hostname=name)
            return self.start_agent(data, config, *extra, env=env)

        def start_agent(
            self, data: Path, config: Path, *extra: str, env: dict | None = None
        ) -> AgentProcess:
            a = AgentProcess(
                data,
                *extra,
                fleet_config=config,
                env={**FAST_BACKOFF, **(env or {})},
                log_path=tmp_path / f"{data.name}-{len(self.agents)}.log",
            )
            self.agents.append(a)
            return a.start()

        def model(self, seed: int, hidden: int = 16) -> Path:
            return models.mlp(
                tmp_path / "onnx" / f"m{seed}-{hidden}.onnx", seed=seed, hidden=hidden
            )

    f = Fleet()
    yield f
    for a in f.agents:
        a.stop()
    for h in f.hubs:
        h.stop()


def active(agent: AgentProcess, model: str = "mlp") -> int:
    try:
        return int(agent_status(agent.admin_socket).get(model, {}).get("active_version", 0))
    except grpc.RpcError:
        return -1


def agents_ls(hub: HubProcess) -> dict[str, dict]:
    resp = hub_admin(hub).ListAgents(pb.ListAgentsRequest(), timeout=10)
    return {a.hostname: MessageToDict(a, preserving_proto_field_name=True) for a in resp.agents}


def model_error(hub: HubProcess, host: str, model: str = "mlp") -> str:
    report = agents_ls(hub)[host].get("report", {})
    for m in report.get("models", []):
        if m["name"] == model:
            return m.get("error", "")
    return ""


def infer_version(agent: AgentProcess) -> str:
    with grpcclient.InferenceServerClient(agent.url) as c:
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        return c.infer("mlp", [inp]).get_response().model_version


def test_enroll_deploy_by_selector_verify_swap_and_report(fleet) -> None:
    hub = fleet.hub()
    berlin = fleet.agent(hub, "berlin-1", "site=berlin,hw=cpu")
    paris = fleet.agent(hub, "paris-1", "site=paris,hw=cpu")
    for a in (berlin, paris):
        a.wait_live()
    assert "published mlp v1" in hub.cli("publish", "mlp", str(fleet.model(0)), "--notes", "one")
    assert "published mlp v2" in hub.cli("publish", "mlp", str(fleet.model(1)))
    out = hub.cli("deploy", "mlp", "1")
    assert "on 2 agent(s)" in out
    wait_for(lambda: active(berlin) == 1 and active(paris) == 1, 60, "v1 everywhere")
    out = hub.cli("deploy", "mlp", "2", "--selector", "site=berlin")
    assert "on 1 agent(s) matching site=berlin" in out
    wait_for(lambda: active(berlin) == 2, 60, "v2 in berlin")
    assert active(paris) == 1
    assert infer_version(berlin) == "2" and infer_version(paris) == "1"
    # Reported back: desired and active per agent, gate verdicts, last seen.
    wait_for(
        lambda: agents_ls(hub)["berlin-1"]["report"]["models"][0]["active_version"] == "2",
        30,
        "berlin report",
    )
    ls = agents_ls(hub)
    b = ls["berlin-1"]
    assert b["labels"] == {"site": "berlin", "hw": "cpu"} and b["status"] == "active"
    assert b["desired"][0]["version"] == "2"
    assert b["report"]["models"][0]["gate_passed"] is True
    assert b["report"]["models"][0]["active_provider"] == "CPUExecutionProvider"
    assert time.time() - b["last_seen"] < 60
    table = hub.cli("agents", "ls")
    assert "berlin-1" in table and "v2 passed on CPU" in table
    # Keys never leave the node; the agent's private key is 0600.
    key = fleet.agents[0].models / "identity" / "agent.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert "BEGIN" not in berlin.logs()


def test_registry_rules_and_lifecycle(fleet) -> None:
    hub = fleet.hub()
    hub.cli("publish", "mlp", str(fleet.model(0)))
    again = hub.cli("publish", "mlp", str(fleet.model(0)), "--version", "1", check=False)
    assert again.returncode == 8 and "already published" in again.stderr
    older = hub.cli("publish", "mlp", str(fleet.model(2)), "--version", "5")
    assert "v5" in older
    low = hub.cli("publish", "mlp", str(fleet.model(3)), "--version", "3", check=False)
    assert low.returncode == 3 and "must be greater than the latest" in low.stderr
    same = hub.cli("publish", "mlp", str(fleet.model(0)))
    assert "v6" in same and "same content as v1" in same
    hub.cli("models", "stage", "mlp", "5", "production")
    hub.cli("models", "stage", "mlp", "1", "retired")
    show = hub.cli("models", "show", "mlp")
    assert "production v5" in show and "retired" in show
    refused = hub.cli("deploy", "mlp", "1", check=False)
    assert refused.returncode == 7 and "retired" in refused.stderr
    missing = hub.cli("deploy", "mlp", "42", check=False)
    assert missing.returncode == 4 and "no version 42" in missing.stderr
    assert "mlp" in hub.cli("models", "ls")


def test_tokens_are_one_time_and_expire(fleet, tmp_path: Path) -> None:
    hub = fleet.hub()
    token = hub.cli("agents", "token", "--labels", "site=x", "--ttl", "10m").strip()

    def enroll(data: str, tok: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "modelfleet.agent.cli",
                "enroll",
                "--token",
                tok,
                "--data",
                str(tmp_path / data),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert enroll("a", token).returncode == 0
    reused = enroll("b", token)
    assert reused.returncode == 9 and "already used" in reused.stderr
    short = hub.cli("agents", "token", "--ttl", "1s").strip()
    time.sleep(1.5)
    expired = enroll("c", short)
    assert expired.returncode != 0 and "expired" in expired.stderr
    garbage = enroll("d", "mft1.bm90LWpzb24")
    assert garbage.returncode == 3
    # A wrong CA fingerprint (a man in the middle's CA) is refused before any secret is sent.
    from modelfleet.kernel.identity import EnrollToken

    tok = EnrollToken.decode(hub.cli("agents", "token").strip())
    forged = EnrollToken(
        tok.token_id, tok.secret, tok.hub_address, "sha256:" + "0" * 64, tok.expires_at
    ).encode()
    mitm = enroll("e", forged)
    assert mitm.returncode == 9 and "fingerprint" in mitm.stderr


def test_revoked_agent_is_refused_and_keeps_serving(fleet) -> None:
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    agent_id = next(iter(agents_ls(hub).values()))["agent_id"]
    assert "revoked" in hub.cli("agents", "revoke", agent_id)
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: "is revoked" in agent.logs(), 30, "agent told it is revoked")
    time.sleep(1)
    assert active(agent) == 1 and infer_version(agent) == "1"
    assert agents_ls(hub)["edge-1"]["status"] == "revoked"


def test_agent_renews_its_certificate_and_outlives_the_first_one(fleet) -> None:
    # Agent certificates live 16 s here (and, like all of them, from 5 minutes before issue for
    # clock skew); the agent renews 10 s before expiry, so every ~6 s. The second renewal then
    # leaves the enrollment certificate 4 s of life for the refusal checked below, and every
    # renewed certificate 10 s for the hub restart.
    hub = fleet.hub("--agent-cert-lifetime-s", "16")
    agent = fleet.agent(
        hub, "edge-1", "site=berlin", env={"MODELFLEET_AGENT_CERT_RENEW_BEFORE_S": "10"}
    )
    ident = agent.models / "identity"
    first_key, first_cert = (ident / "agent.key").read_bytes(), (ident / "agent.crt").read_bytes()
    first_expiry = load_certificate(first_cert).not_valid_after_utc.timestamp()
    old_creds = grpc.ssl_channel_credentials((ident / "ca.crt").read_bytes(), first_key, first_cert)

    def hub_accepts(creds: grpc.ChannelCredentials) -> bool:
        with grpc.secure_channel(hub.url, creds) as channel:
            try:
                list(
                    pb_grpc.FleetStub(channel).FetchMetadata(
                        pb.FetchRequest(path="timestamp.json"), timeout=5
                    )
                )
                return True
            except grpc.RpcError:
                return False

    assert hub_accepts(old_creds)  # the check below can fail: the first certificate works now
    # A malformed request is refused with a reason, and changes nothing.
    bad = pb.RenewCertificateRequest(csr_pem=b"not a CSR")
    with grpc.secure_channel(hub.url, old_creds) as ch, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.FleetStub(ch).RenewCertificate(bad, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "certificate signing request is not valid PEM" in refused.value.details()
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    wait_for(lambda: "renewed the agent certificate" in agent.logs(), 30, "a renewal")
    assert (ident / "agent.key").read_bytes() != first_key  # a new key, made on the node
    assert stat.S_IMODE((ident / "agent.key").stat().st_mode) == 0o600
    wait_for(
        lambda: agents_ls(hub)["edge-1"]["cert_expires_at"] > first_expiry,
        10,
        "the new expiry in agents ls",
    )
    assert "renewed the certificate of agent" in hub.logs()
    # Once the agent has renewed twice, the enrollment certificate (still valid) can no longer
    # renew: a copy of that key would die with it.
    wait_for(lambda: agent.logs().count("renewed the agent certificate") >= 2, 30, "2 renewals")
    csr = make_csr(generate_key(), "x")
    with grpc.secure_channel(hub.url, old_creds) as ch, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.FleetStub(ch).RenewCertificate(pb.RenewCertificateRequest(csr_pem=csr), timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "replaced by an earlier renewal" in refused.value.details()

    # Past the first certificate's end: the hub refuses it. Restarting the hub drops every
    # connection, so the agent must handshake again, with the renewed certificate.
    wait_for(lambda: time.time() > first_expiry + 1, 30, "the first certificate to expire")
    assert not hub_accepts(old_creds)
    hub = fleet.restart_hub(hub, "--agent-cert-lifetime-s", "16")
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 60, "v2 after the restart, on a renewed certificate")

    def failed_renewals() -> list[str]:
        return [
            line
            for line in agent.logs().splitlines()
            if "renewing the agent certificate failed" in line
        ]

    # Only while the hub was restarting, and retried.
    assert all("hub unreachable" in line for line in failed_renewals()), failed_renewals()
    assert sorted(p.name for p in ident.iterdir()) == ["agent.crt", "agent.key", "ca.crt"]

    # A revoked agent gets no new certificate: its renewals are refused (and it keeps serving).
    agent_id = agents_ls(hub)["edge-1"]["agent_id"]
    hub.cli("agents", "revoke", agent_id)
    wait_for(lambda: any("is revoked" in line for line in failed_renewals()), 30, "refusal")
    assert infer_version(agent) == "2"


def tamper_blob(hub: HubProcess, version: int, how: str) -> None:
    con = sqlite3.connect(hub.data / "registry.db")
    (sha,) = con.execute("SELECT sha256 FROM versions WHERE version = ?", (version,)).fetchone()
    con.close()
    blob = hub.data / "blobs" / "sha256" / sha[:2] / sha
    data = bytearray(blob.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 512]
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_tampered_bundle_is_refused(fleet, how: str) -> None:
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    tamper_blob(hub, 2, how)
    hub.cli("deploy", "mlp", "2")
    words = "hash" if how == "flip" else "length"
    wait_for(lambda: words in model_error(hub, "edge-1").lower(), 60, "refusal reported")
    assert active(agent) == 1 and infer_version(agent) == "1"
    assert not list((agent.models / "cache" / "bundles" / "mlp").glob("2"))


def test_metadata_rollback_is_refused(fleet) -> None:
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    old_timestamp = (hub.data / "tuf" / "timestamp.json").read_bytes()
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 60, "v2 (agent has seen the newer timestamp)")
    hub.cli("publish", "mlp", str(fleet.model(2)))
    # A compromised mirror replays the older timestamp.
    (hub.data / "tuf" / "timestamp.json").write_bytes(old_timestamp)
    hub.cli("deploy", "mlp", "3")
    wait_for(lambda: "rollback" in model_error(hub, "edge-1").lower(), 60, "rollback refused")
    assert active(agent) == 2


def test_expired_metadata_is_refused(fleet) -> None:
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    hub.cli("publish", "mlp", str(fleet.model(1)))
    # A freeze attack: whoever holds the online timestamp key (the hub refuses settings that
    # would let its own timestamp lapse) serves a newer timestamp that has already expired.
    from datetime import UTC, datetime, timedelta

    from tuf.api.metadata import Metadata

    from modelfleet.hub.signing import load_signer

    path = hub.data / "tuf" / "timestamp.json"
    md = Metadata.from_bytes(path.read_bytes())
    md.signed.version += 1
    md.signed.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    md.sign(load_signer(hub.data / "keys" / "timestamp.pem"), append=False)
    path.write_bytes(md.to_bytes())
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: "expired" in model_error(hub, "edge-1").lower(), 60, "freeze refused")
    assert active(agent) == 1


def test_metadata_signed_by_the_wrong_key_is_refused(fleet) -> None:
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    hub.cli("publish", "mlp", str(fleet.model(1)))
    # An attacker without the timestamp key signs a newer timestamp with a key of their own.
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata

    path = hub.data / "tuf" / "timestamp.json"
    md = Metadata.from_bytes(path.read_bytes())
    md.signed.version += 1
    md.sign(CryptoSigner.generate_ed25519(), append=False)
    path.write_bytes(md.to_bytes())
    hub.cli("deploy", "mlp", "2")
    # The hub verifies what it serves and refuses it; the agent reports the hub's reason.
    wait_for(
        lambda: "not signed by the timestamp key" in model_error(hub, "edge-1"), 60, "bad signature"
    )
    assert "REFUSING the TUF metadata" in hub.logs()
    assert active(agent) == 1


def test_unsigned_model_is_refused(fleet) -> None:
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    # A compromised registry invents version 9 (pointing at v1's bytes) and deploys it; the
    # targets metadata, signed by a key the database cannot touch, knows nothing of it.
    con = sqlite3.connect(hub.data / "registry.db")
    con.execute(
        "INSERT INTO versions (name, version, sha256, size, stage, notes, created_at, "
        "target_path, signed, manifest) SELECT name, 9, sha256, size, stage, notes, created_at, "
        "'mlp/9/bundle.tar', 1, manifest FROM versions WHERE version = 1"
    )
    con.execute(
        "INSERT INTO deployments (name, version, selector, created_at) VALUES ('mlp', 9, '{}', 0)"
    )
    con.commit()
    con.close()
    hub = fleet.restart_hub(hub)  # a restart makes the hub's watchers see the new revision
    wait_for(lambda: "not signed" in model_error(hub, "edge-1").lower(), 60, "unsigned refused")
    assert active(agent) == 1


def test_offline_targets_key(fleet, tmp_path: Path) -> None:
    offline = tmp_path / "offline-keys"
    cmd = ["keys", "init", "--offline", str(offline)]
    subprocess.run(
        [sys.executable, "-m", "modelfleet.hub.cli", "--data", str(tmp_path / "hub"), *cmd],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    assert not (tmp_path / "hub" / "keys" / "targets.pem").exists()
    assert oct((offline / "targets.pem").stat().st_mode & 0o777) == "0o600"
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    unsigned = hub.cli("publish", "mlp", str(fleet.model(0)), check=False)
    assert unsigned.returncode == 7 and "NOT signed" in unsigned.stderr
    refused = hub.cli("deploy", "mlp", "1", check=False)
    assert refused.returncode == 7 and "not signed" in refused.stderr
    hub.cli("publish", "mlp", str(fleet.model(1)), "--targets-key", str(offline / "targets.pem"))
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 60, "v2 signed offline, deployed")
    # Signing v2 signed v2 only (tests/security/test_signing_attacks.py); a later version is
    # signed on its own with the digest publish printed.
    assert "NO" in hub.cli("models", "versions", "mlp").splitlines()[1]
    later = hub.cli("publish", "mlp", str(fleet.model(2)), check=False)
    digest = later.stderr.split("--sha256 ")[1].split()[0]
    assert "signed mlp v3" in hub.cli(
        "sign", "mlp", "3", "--targets-key", str(offline / "targets.pem"), "--sha256", digest
    )
    hub.cli("deploy", "mlp", "3")
    wait_for(lambda: active(agent) == 3, 60, "v3 signed later with `sign`")


def test_kill_mid_download_then_resume(fleet) -> None:
    # ~16 MB bundle at 4 MB/s: several seconds of download to interrupt.
    hub = fleet.hub("--transfer-rate-limit-mbps", "4")
    data = fleet.model(0, hidden=2000)
    hub.cli(
        "publish",
        "mlp",
        str(models.mlp(data.with_name("big.onnx"), inputs=4, hidden=2000, layers=2, seed=5)),
    )
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    partial = agent.models / "cache" / "partial"
    hub.cli("deploy", "mlp", "1")

    def part_size() -> int:
        # The archive is unpacked as it arrives, under partial/<sha256>/.
        return sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())

    wait_for(lambda: part_size() > 3_000_000, 60, "download under way")
    agent.kill()
    had = part_size()
    assert had > 0
    again = fleet.start_agent(agent.models, agent.models / "agent.toml")
    wait_for(lambda: active(again) == 1, 120, "v1 after resume")
    assert "resuming mlp/1 at byte" in again.logs()
    assert not list(partial.iterdir())


def test_key_rotation_with_the_hub_stopped_and_agents_following(fleet) -> None:
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    # A running hub keeps its signers in memory: rotating under it is refused, and so is a
    # second hub on the same data.
    running = hub.cli("keys", "rotate", "timestamp", check=False)
    assert running.returncode != 0 and "a hub is running on" in running.stderr
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelfleet.hub.cli",
            "--data",
            str(hub.data),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0 and "cannot start the hub: a hub is running" in second.stderr
    hub.stop()
    assert "root v2: the timestamp key is now" in hub.cli("keys", "rotate", "timestamp")
    assert "root v3: the targets key is now" in hub.cli("keys", "rotate", "targets")
    assert "root v4: the root key is renewed" in hub.cli("keys", "rotate", "root", "--renew")
    wrong = hub.cli(
        "keys",
        "rotate",
        "snapshot",
        "--root-key",
        str(hub.data / "keys" / "snapshot.pem"),
        check=False,
    )
    assert wrong.returncode != 0 and "is not a root key of root v4" in wrong.stderr
    assert oct((hub.data / "keys" / "timestamp.pem").stat().st_mode & 0o777) == "0o600"
    hub = fleet.restart_hub(hub)
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 60, "v2 through the rotated keys")
    trusted = json.loads((agent.models / "tuf" / "root.json").read_text())
    assert trusted["signed"]["version"] == 4


def test_hub_restart_keeps_state_and_agent_restart_offline(fleet) -> None:
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "2", "--selector", "site=berlin")
    wait_for(lambda: active(agent) == 2, 60, "v2")
    hub = fleet.restart_hub(hub)
    assert "2" in hub.cli("models", "ls")
    ls = agents_ls(hub)
    assert ls["edge-1"]["desired"][0]["version"] == "2"
    # The agent reconnects on its own (backoff) and stays on v2.
    wait_for(lambda: time.time() - agents_ls(hub)["edge-1"]["last_seen"] < 5, 60, "reconnected")
    assert active(agent) == 2
    # Hub down, agent restarted: it serves its cached, verified bundle.
    hub.stop()
    agent.stop()
    again = fleet.start_agent(agent.models, agent.models / "agent.toml")
    again.wait_model("mlp", timeout=60)
    assert infer_version(again) == "2"
    wait_for(lambda: "retrying" in again.logs(), 30, "reconnect attempts logged")


def test_hub_stops_at_once_while_agents_watch(fleet, tmp_path: Path) -> None:
    # Found by the soak (make soak): every hub restart took the whole drain timeout, because an
    # agent's WatchDesired stream never ends on its own. A drain far longer than the test's
    # patience makes a stream that holds it impossible to miss.
    config = tmp_path / "hub.toml"
    config.write_text("[hub]\ndrain_timeout_s = 30.0\n")
    hub = fleet.hub("--config", str(config))
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1, through the watch stream")
    started = time.monotonic()
    assert hub.stop(timeout=25) == 0
    assert time.monotonic() - started < 10
    assert "stopped" in hub.logs()
    # The agent lost its hub, not its model.
    assert infer_version(agent) == "1"


def open_under(pid: int, root: Path) -> list[str]:
    """What a process holds open under ``root`` (a deleted file ends in " (deleted)")."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed while listing
        if target.startswith(str(root)):
            held.append(target)
    return sorted(held)


def test_publishing_leaves_no_file_open_in_the_hub(fleet) -> None:
    # Found by the soak (make soak): the hub kept one descriptor per upload, on the blob it
    # became (or on the deleted upload of a refused one), so its descriptors grew by one with
    # every publish until it ran out.
    hub = fleet.hub()
    assert hub.proc is not None
    hub.cli("publish", "mlp", str(fleet.model(0)))
    before = open_under(hub.proc.pid, hub.data)
    hub.cli("publish", "mlp", str(fleet.model(1)))
    refused = hub.cli("publish", "mlp", str(fleet.model(2)), "--version", "1", check=False)
    assert refused.returncode != 0
    assert open_under(hub.proc.pid, hub.data) == before


def test_hub_refreshes_timestamp_before_it_expires(fleet) -> None:
    hub = fleet.hub("--timestamp-expiry-s", "4", "--refresh-interval-s", "0.5")
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    time.sleep(5)  # longer than the timestamp's lifetime: only re-signing keeps it valid
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1 with a refreshed timestamp")
    assert "re-signed timestamp" in hub.logs()


def test_restart_offline_keeps_serving_when_the_desired_version_never_arrived(fleet) -> None:
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    hub.cli("publish", "mlp", str(fleet.model(0)))
    hub.cli("publish", "mlp", str(fleet.model(1)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    tamper_blob(hub, 2, "flip")
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: "hash" in model_error(hub, "edge-1").lower(), 60, "v2 refused")
    hub.stop()
    agent.stop()
    again = fleet.start_agent(agent.models, agent.models / "agent.toml")
    again.wait_model("mlp", timeout=60)
    assert infer_version(again) == "1"
    # v1 is the last version that passed its gate: it serves first (served.json).
    assert json.loads((agent.models / "served.json").read_text())["last_good"] == {"mlp": 1}
