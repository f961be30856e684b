"""The audit trail and the role gate against a caller who means harm, on a real hub
(docs/security.md#audit-trail): calls without a certificate on the enrollment port (refused,
recorded, and unable to fill the disk), credentials inside request strings (never stored), and
a long field that would push the rest of a request out of its entry."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from modelfleet.hub.audit_edge import REFUSALS_BURST
from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc
from tests import models
from tests.procs import HubProcess, enroll_agent


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("abuse")
    h = HubProcess(work / "hub", log_path=work / "hub.log").start()
    h.cli("publish", "mlp", str(models.mlp(work / "m.onnx")), "--version", "1")
    yield h
    h.stop()


def trail(hub: HubProcess) -> list[dict]:
    return json.loads(hub.cli("audit", "--json", "--limit", "10000"))


def admin_channel(hub: HubProcess) -> grpc.Channel:
    folder = hub.data / "admin"
    creds = grpc.ssl_channel_credentials(
        (folder / "ca.crt").read_bytes(),
        (folder / "admin.key").read_bytes(),
        (folder / "admin.crt").read_bytes(),
    )
    return grpc.secure_channel(hub.url, creds)


def anonymous_channel(hub: HubProcess) -> grpc.Channel:
    # The enrollment port verifies the hub only: a caller there has no client certificate.
    ca = (hub.data / "admin" / "ca.crt").read_bytes()
    return grpc.secure_channel(f"127.0.0.1:{hub.enroll_port}", grpc.ssl_channel_credentials(ca))


def denied(call: object) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        call()  # type: ignore[operator]
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value.details()
    assert "client certificate" in (refused.value.details() or "")


def test_calls_without_a_certificate_are_refused_recorded_and_bounded(hub: HubProcess) -> None:
    big = "x" * 100_000
    with anonymous_channel(hub) as channel:
        admin = pb_grpc.HubAdminStub(channel)
        capture = pb_grpc.HubCaptureStub(channel)
        header = pb.PublishChunk(header=pb.PublishHeader(name="evil", version=7, size=1))
        denied(lambda: admin.ListAdmins(pb.ListAdminsRequest(), timeout=30))
        denied(lambda: admin.Deploy(pb.DeployRequest(name="mlp", version=1), timeout=30))
        denied(lambda: admin.Publish(iter([header]), timeout=30))
        denied(lambda: list(admin.Backup(pb.BackupRequest(), timeout=30)))
        denied(lambda: list(capture.QueryCapture(pb.QueryCaptureRequest(model="m"), timeout=30)))
        # Anyone who reaches the enrollment port can try again and again: each refusal used to
        # be one synced entry of up to 4 KB, with no bound but the retention (a year).
        for _ in range(REFUSALS_BURST + 150):
            with pytest.raises(grpc.RpcError):
                admin.Deploy(pb.DeployRequest(name=big, version=1), timeout=30)
        # Once the budget refills, the next entry says how many were left out.
        deadline = time.monotonic() + 30
        while True:
            with pytest.raises(grpc.RpcError):
                admin.ListAdmins(pb.ListAdminsRequest(), timeout=30)
            noted = [e for e in trail(hub) if "were not recorded" in e["detail"]]
            if noted or time.monotonic() > deadline:
                break
            time.sleep(1)
    anonymous = [e for e in trail(hub) if e["identity"] == ""]
    methods = {e["method"] for e in anonymous}
    assert {"ListAdmins", "Deploy", "Publish", "Backup", "QueryCapture"} <= methods, methods
    assert all(e["code"] == "PERMISSION_DENIED" for e in anonymous), anonymous
    # Refused before anything ran: no entry was begun as a change.
    assert not [e for e in anonymous if e["code"] == "UNFINISHED"]
    assert len(anonymous) <= REFUSALS_BURST + 40, len(anonymous)
    assert noted and "refused calls by this identity" in noted[0]["detail"], noted
    # What a caller without a certificate sends is counted, not written out.
    assert max(len(e["request"]) for e in anonymous) < 200
    assert "xxxxxxxxxx" not in json.dumps(anonymous)
    assert "not recorded" in hub.logs()


def test_credentials_inside_request_strings_never_reach_the_trail(hub: HubProcess) -> None:
    secrets = ("hunter2-pw", "tok-9d2e71", "s3secret-55")
    with admin_channel(hub) as channel:
        alerts = pb_grpc.HubAlertsStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            # Refused by the hub (it will not store it), but recorded before it ran.
            alerts.AddWebhook(
                pb.AddWebhookRequest(
                    name="a", url="https://ops:hunter2-pw@hooks.example.com/x", secret=b"k" * 32
                ),
                timeout=30,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        alerts.AddWebhook(
            pb.AddWebhookRequest(
                name="b",
                url="https://hooks.example.com/x?token=tok-9d2e71&team=ml",
                secret=b"k" * 32,
            ),
            timeout=30,
        )
        spec = pb.JobSpec(
            name="nightly",
            model="mlp",
            schedule="0 2 * * *",
            input="s3://AKIAEXAMPLE:s3secret-55@bucket/in.parquet",
            output="/tmp/out",
        )
        # Refused or not: a change is recorded either way.
        with contextlib.suppress(grpc.RpcError):
            pb_grpc.HubAdminStub(channel).CreateJob(pb.CreateJobRequest(spec=spec), timeout=30)
    entries = [e for e in trail(hub) if e["method"] in ("AddWebhook", "CreateJob")]
    assert len(entries) == 3, entries
    text = json.dumps(entries)
    assert "hooks.example.com" in text and "team=ml" in text and "bucket/in.parquet" in text
    assert "<redacted>" in text
    for side in hub.data.glob("audit.sqlite*"):
        raw = side.read_bytes()
        for secret in secrets:
            assert secret.encode() not in raw, (side.name, secret)


def test_a_long_field_does_not_push_the_rest_out_of_the_entry(
    hub: HubProcess, tmp_path: Path
) -> None:
    # Notes may be 4 KB: the entry used to end inside them, without the bundle's size and
    # SHA-256 (which bundle was published).
    notes = "n" * 4000
    onnx = models.mlp(tmp_path / "m.onnx")
    hub.cli("publish", "mlp", str(onnx), "--version", "2", "--notes", notes)
    [published] = [
        e for e in trail(hub) if e["method"] == "Publish" and "version: 2" in e["request"]
    ]
    versions = json.loads(hub.cli("models", "versions", "mlp", "--json"))
    [v2] = [v for v in versions if v["version"] == 2]
    assert f'size: {v2["size"]} sha256: "{v2["sha256"]}"' in published["request"], published
    assert hashlib.sha256(notes.encode()).hexdigest() in published["request"]
    # A state file padded with a comment: the entry names the whole document by its SHA-256,
    # which matches `sha256sum` of the file that was applied.
    doc = "# " + "pad " * 800 + '\n[[deployment]]\nmodel = "mlp"\nversion = 1\n'
    state = tmp_path / "fleet.toml"
    state.write_text(doc)
    hub.cli("apply", "-f", str(state), check=False)
    [applied] = [e for e in trail(hub) if e["method"] == "ApplyState"]
    assert hashlib.sha256(state.read_bytes()).hexdigest() in applied["request"], applied
    assert f"{len(doc)} chars" in applied["request"]


def test_an_export_the_client_cuts_short_is_recorded_as_cancelled(hub: HubProcess) -> None:
    # Part of the backup (CA and TUF keys among it) has left the hub: the entry must say the
    # caller went away, not that the hub failed in some unknown way.
    with admin_channel(hub) as channel:
        stream = pb_grpc.HubAdminStub(channel).Backup(pb.BackupRequest(), timeout=30)
        next(stream)
        stream.cancel()
    deadline = time.monotonic() + 10
    while not (backups := [e for e in trail(hub) if e["method"] == "Backup" and e["identity"]]):
        assert time.monotonic() < deadline, "no Backup entry"
        time.sleep(0.2)
    assert backups[-1]["code"] == "CANCELLED", backups[-1]


def test_a_revoked_agent_cannot_fill_the_trail(hub: HubProcess, tmp_path: Path) -> None:
    # mTLS still accepts a revoked agent's certificate (the registry refuses it), so a stolen
    # node can call its capture methods without end: each refusal is budgeted like any other.
    enroll_agent(hub, tmp_path / "agent", "role=edge", hostname="stolen-1")
    folder = tmp_path / "agent" / "identity"
    cert = x509.load_pem_x509_certificate((folder / "agent.crt").read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    agent_id = str(cn).removeprefix("agent:")
    hub.cli("agents", "revoke", agent_id)
    creds = grpc.ssl_channel_credentials(
        (folder / "ca.crt").read_bytes(),
        (folder / "agent.key").read_bytes(),
        (folder / "agent.crt").read_bytes(),
    )
    request = pb.CaptureFile(model="mlp", file_id="1-ab", size=1, sha256="0" * 64)
    with grpc.secure_channel(hub.url, creds) as channel:
        stub = pb_grpc.HubCaptureStub(channel)
        for _ in range(REFUSALS_BURST + 100):
            with pytest.raises(grpc.RpcError) as refused:
                stub.CaptureOffset(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in (refused.value.details() or "")
    mine = [e for e in trail(hub) if e["identity"] == f"agent:{agent_id}"]
    assert 0 < len(mine) <= REFUSALS_BURST, len(mine)
    assert all(e["code"] == "PERMISSION_DENIED" for e in mine)
