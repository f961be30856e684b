"""The audit trail on a real hub: changes, refusals with the wrong identity, secrets left out,
and a hub killed with -9 in the middle of a publish (docs/security.md#audit-trail)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc
from tests import models
from tests.procs import HubProcess, enroll_agent, wait_for

SECRET = b"webhook-secret-4f1c9e"


def _creds(folder: Path, key: str, cert: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (folder / "ca.crt").read_bytes(), (folder / key).read_bytes(), (folder / cert).read_bytes()
    )


def audit(hub: HubProcess, *flags: str) -> list[dict]:
    return json.loads(hub.cli("audit", "--json", *flags))


def test_changes_refusals_and_a_kill_9_are_in_the_trail(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path / "hub", log_path=tmp_path / "hub.log").start()
    restarted: HubProcess | None = None
    try:
        onnx = models.mlp(tmp_path / "m.onnx")
        hub.cli("publish", "mlp", str(onnx), "--version", "1")
        hub.cli("models", "ls")  # a read that succeeds: not recorded
        missing = hub.cli("deploy", "mlp", "9", "--allow-empty", check=False)
        assert missing.returncode != 0
        admin = _creds(hub.data / "admin", "admin.key", "admin.crt")
        with grpc.secure_channel(hub.url, admin) as channel:
            pb_grpc.HubAlertsStub(channel).AddWebhook(
                pb.AddWebhookRequest(name="ops", url="http://127.0.0.1:9/", secret=SECRET),
                timeout=30,
            )
        # An agent's identity calling the admin services: refused, and recorded as that agent.
        enroll_agent(hub, tmp_path / "agent", "role=edge", hostname="edge-1")
        agent = _creds(tmp_path / "agent" / "identity", "agent.key", "agent.crt")
        with grpc.secure_channel(hub.url, agent) as channel:
            for call, request in (
                (pb_grpc.HubAdminStub(channel).Deploy, pb.DeployRequest(name="mlp", version=1)),
                (pb_grpc.HubAdminStub(channel).ListAudit, pb.ListAuditRequest()),
                (pb_grpc.HubAlertsStub(channel).ListWebhooks, pb.ListWebhooksRequest()),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    call(request, timeout=30)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

        entries = audit(hub)
        by_method = {e["method"]: e for e in entries}
        publish = by_method["Publish"]
        assert (publish["identity"], publish["code"]) == ("admin:admin", "OK")
        assert 'name: "mlp"' in publish["request"] and "version: 1" in publish["request"]
        assert "ListModels" not in by_method
        failed_deploy = [
            e for e in entries if e["method"] == "Deploy" and e["identity"] == "admin:admin"
        ]
        assert failed_deploy and failed_deploy[0]["code"] != "OK" and failed_deploy[0]["detail"]
        assert "version: 9" in failed_deploy[0]["request"]
        webhook = by_method["AddWebhook"]
        assert webhook["code"] == "OK" and "<redacted, 21 bytes>" in webhook["request"]
        assert by_method["CreateToken"]["code"] == "OK"  # the enrollment token `agents token` made
        refused = audit(hub, "--identity", enroll_identity(entries))
        assert {e["method"] for e in refused} == {"Deploy", "ListAudit", "ListWebhooks"}
        assert all(e["code"] == "PERMISSION_DENIED" for e in refused)
        assert all("agent identities may not call this method" in e["detail"] for e in refused)
        assert {e["method"] for e in audit(hub, "--failed")} >= {"Deploy", "ListWebhooks"}
        assert [e["method"] for e in audit(hub, "--method", "AddWebhook")] == ["AddWebhook"]

        # kill -9 while a publish is under way: its entry stays, UNFINISHED, saying what it was.
        holding = threading.Event()
        sent = threading.Event()

        def chunks() -> Iterator[pb.PublishChunk]:
            yield pb.PublishChunk(header=pb.PublishHeader(name="held", version=5, size=1 << 20))
            yield pb.PublishChunk(data=b"\0" * 1024)
            sent.set()
            holding.wait(60)

        def publish_and_hold() -> None:
            # The hub is killed under it.
            with grpc.secure_channel(hub.url, admin) as channel, contextlib.suppress(grpc.RpcError):
                pb_grpc.HubAdminStub(channel).Publish(chunks(), timeout=60)

        sender = threading.Thread(target=publish_and_hold, daemon=True)
        sender.start()
        assert sent.wait(30)
        wait_for(
            lambda: any(e["method"] == "Publish" and "held" in e["request"] for e in audit(hub)),
            30,
            "the held publish in the trail",
        )
        hub.kill()
        holding.set()
        sender.join(30)
        restarted = HubProcess(hub.data, log_path=tmp_path / "hub-2.log")
        restarted.port, restarted.enroll_port, restarted.url = hub.port, hub.enroll_port, hub.url
        restarted.start()
        after = audit(restarted, "--limit", "10000")
        held = [e for e in after if e["method"] == "Publish" and '"held"' in e["request"]]
        assert len(held) == 1 and held[0]["code"] == "UNFINISHED", held
        assert held[0]["identity"] == "admin:admin" and "version: 5" in held[0]["request"]
        # Everything from before the kill is still there, in order.
        assert [e["id"] for e in after if e["id"] <= entries[-1]["id"]] == [
            e["id"] for e in entries
        ]
        # No secret anywhere in the trail's files.
        for f in (hub.data).glob("audit.sqlite*"):
            assert SECRET not in f.read_bytes(), f
    finally:
        if restarted is not None:
            restarted.stop()
        hub.stop()


def enroll_identity(entries: list[dict]) -> str:
    """The agent identity that made the refused calls."""
    (who,) = {e["identity"] for e in entries if e["identity"].startswith("agent:")}
    return who
