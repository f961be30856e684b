"""Alerts on a real hub with a real agent whose model fails on purpose, notifying a real HTTP
receiver: fires once, resolves once, and a hub killed (-9) mid-retry delivers the same
notification exactly once after its restart. Only admins change rules."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from modelfleet.hub.webhooks import KEY_HEADER, verify
from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc
from tests import models
from tests.procs import AgentProcess, HubProcess, agent_status, enroll_agent, wait_for
from tests.webhook_receiver import Receiver

FAST = {
    "MODELFLEET_AGENT_REPORT_INTERVAL_S": "0.5",
    "MODELFLEET_AGENT_BACKOFF_MAX_S": "1",
    "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "1",
}
SECRET = b"a-webhook-secret-for-the-fleet-test"
HUB_CONFIG = """[hub]
alert_interval_s = 0.3
webhook_backoff_s = 0.3
webhook_backoff_max_s = 1.0
webhook_timeout_s = 5.0
"""


class Load:
    """Requests to the reshape model: 1 row fails in the model (a runtime error counted as a
    failure), 3 rows succeed."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.rows = 0  # 0: idle
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(self.agent.url) as c:
            while not self.stop.is_set():
                rows = self.rows
                if rows:
                    inp = grpcclient.InferInput("x", [rows, 4], "FP32")
                    inp.set_data_from_numpy(np.ones((rows, 4), np.float32))
                    with contextlib.suppress(Exception):
                        c.infer("scorer", [inp])
                time.sleep(0.02)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    root = tmp_path_factory.mktemp("alerts")
    (root / "hub.toml").write_text(HUB_CONFIG)
    hub = HubProcess(root / "hub", "--config", str(root / "hub.toml"), log_path=root / "hub.log")
    hub.start()
    agent = None
    load = None
    with Receiver() as receiver:
        try:
            config = enroll_agent(hub, root / "a0", "site=berlin", hostname="edge-0")
            agent = AgentProcess(
                root / "a0", fleet_config=config, env=FAST, log_path=root / "a0.log"
            ).start()
            samples = root / "samples.npz"
            np.savez(samples, x=np.ones((3, 4), np.float32))
            model = models.reshape_model(root / "reshape.onnx")
            hub.cli(
                "publish", "scorer", str(model), "--max-batch-size", "0", "--samples", str(samples)
            )
            hub.cli("deploy", "scorer", "1")
            wait_for(lambda: active(agent) == 1, 120, "scorer v1 on the agent")
            secret_file = root / "secret"
            secret_file.write_bytes(SECRET + b"\n")
            hub.cli("webhooks", "add", "ops", receiver.url, "--secret-file", str(secret_file))
            hub.cli(
                "alerts",
                "rule",
                "set",
                "error-rate",
                "--for",
                "1s",
                "--window",
                "3s",
                "--clear-for",
                "2s",
                "--min-requests",
                "5",
            )
            load = Load(agent)
            load.thread.start()
            yield hub, agent, receiver, load
        finally:
            if load is not None:
                load.stop.set()
                load.thread.join(10)
            if agent is not None:
                agent.stop()
            hub.stop()


def active(agent: AgentProcess) -> int:
    try:
        return int(agent_status(agent.admin_socket).get("scorer", {}).get("active_version", 0))
    except Exception:
        return -1


def sent(receiver: Receiver, state: str) -> list[tuple[dict, dict, int]]:
    """(headers, body, status answered) of every request in ``state``."""
    out = []
    for (headers, raw), status in zip(receiver.requests, receiver.answered, strict=False):
        body = json.loads(raw)
        if body["state"] == state:
            out.append((headers, body, status))
    return out


def test_failing_requests_fire_the_error_rate_alert_once_with_a_signed_payload(fleet) -> None:
    hub, _agent, receiver, load = fleet
    load.rows = 1
    wait_for(lambda: sent(receiver, "firing"), 60, "a firing notification", interval=0.2)
    time.sleep(2)  # several more evaluations while it keeps firing: nothing more is sent
    [(headers, body, _)] = sent(receiver, "firing")
    raw = next(r for h, r in receiver.requests if h[KEY_HEADER] == body["idempotency_key"])
    assert verify(SECRET, raw, headers, time.time())
    assert verify(SECRET, raw.replace(b"firing", b"resolved"), headers, time.time()) is False
    assert (body["rule"], body["model"], body["version"]) == ("error-rate", "scorer", 1)
    assert body["value"] > 0.01 and body["threshold"] == 0.01
    assert body["evidence"]["failures"] > 0
    assert headers[KEY_HEADER] == body["idempotency_key"]
    listed = json.loads(hub.cli("alerts", "ls", "--json"))
    [alert] = [a for a in listed["alerts"] if a["rule"] == "error-rate"]
    assert (alert["state"], alert["model"], alert["version"]) == ("firing", "scorer", 1)
    table = hub.cli("alerts", "ls")
    # Every built-in metric has a source on a running hub (accuracy: late labels, hub.outcomes).
    assert "no data yet" not in table
    assert any(
        line.split()[:3] == ["firing", "error-rate", "scorer"] for line in table.splitlines()
    )
    # The secret is stored on the hub, never shown or logged.
    assert SECRET.decode() not in hub.cli("webhooks", "ls")
    assert SECRET.decode() not in hub.cli("webhooks", "ls", "--json")
    assert SECRET.decode() not in hub.logs()


def test_the_alert_resolves_once_after_the_failures_stop(fleet) -> None:
    hub, _agent, receiver, load = fleet
    load.rows = 3
    wait_for(lambda: sent(receiver, "resolved"), 60, "a resolved notification", interval=0.2)
    time.sleep(1)
    [(_, body, _)] = sent(receiver, "resolved")
    assert len(sent(receiver, "firing")) == 1
    [(_, fired, _)] = sent(receiver, "firing")
    assert body["since"] == fired["since"]  # the same episode...
    assert body["idempotency_key"] != fired["idempotency_key"]  # ...a different event
    history = json.loads(hub.cli("alerts", "history", "--json"))
    states = [e["state"] for e in history if e["rule"] == "error-rate"]
    assert states == ["pending", "firing", "resolved"]
    assert "resolved" in hub.cli("alerts", "history", "--since", "1h")


def test_hub_killed_mid_retry_delivers_the_same_key_exactly_once_after_restart(fleet) -> None:
    hub, _agent, receiver, load = fleet
    before = len(receiver.requests)
    receiver.status = 503
    load.rows = 1

    def new_firing() -> list[str]:
        return [
            h[KEY_HEADER]
            for h, raw in receiver.requests[before:]
            if json.loads(raw)["state"] == "firing"
        ]

    wait_for(lambda: len(new_firing()) >= 2, 60, "two refused attempts", interval=0.1)
    hub.kill()
    load.rows = 0
    [key] = set(new_firing())
    receiver.status = 200
    restarted = HubProcess(hub.data, *hub.extra, log_path=hub.log_path.with_name("hub-2.log"))
    restarted.port, restarted.enroll_port, restarted.url = hub.port, hub.enroll_port, hub.url
    hub.proc, hub._log = restarted.start().proc, restarted._log  # the fixture stops it
    delivered = []

    def got_it() -> bool:
        delivered[:] = [
            status
            for (h, _), status in zip(receiver.requests, receiver.answered, strict=False)
            if h[KEY_HEADER] == key and status == 200
        ]
        return bool(delivered)

    wait_for(got_it, 60, "delivery after the restart", interval=0.1)
    time.sleep(2)  # retries would come within a second (backoff cap 1 s)
    got_it()
    assert delivered == [200]
    firing_keys = set(new_firing())
    assert firing_keys == {key}  # every attempt, before and after the kill, had one key
    bodies = {raw for h, raw in receiver.requests if h[KEY_HEADER] == key}
    assert len(bodies) == 1


def test_an_agent_identity_cannot_read_or_change_alert_rules(fleet) -> None:
    hub, agent, _receiver, _load = fleet
    ident = agent.models / "identity"
    creds = grpc.ssl_channel_credentials(
        (ident / "ca.crt").read_bytes(),
        (ident / "agent.key").read_bytes(),
        (ident / "agent.crt").read_bytes(),
    )

    def rules() -> list:
        return json.loads(hub.cli("alerts", "ls", "--json"))["rules"]

    before = rules()
    with grpc.secure_channel(hub.url, creds) as channel:
        stub = pb_grpc.HubAlertsStub(channel)
        calls = [
            (stub.SetAlertRule, pb.AlertRule(name="error-rate", metric="error_rate")),
            (stub.RemoveAlertRule, pb.RemoveAlertRuleRequest(name="error-rate")),
            (stub.AddWebhook, pb.AddWebhookRequest(name="evil", url="http://127.0.0.1:9/")),
            (stub.RemoveWebhook, pb.RemoveWebhookRequest(name="ops")),
            (stub.ListWebhooks, pb.ListWebhooksRequest()),
        ]
        for fn, request in calls:
            with pytest.raises(grpc.RpcError) as refused:
                fn(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "agent identities may not call this method" in refused.value.details()
    assert rules() == before
    assert [w["name"] for w in json.loads(hub.cli("webhooks", "ls", "--json"))] == ["ops"]


def test_cli_rule_commands_explain_mistakes(fleet) -> None:
    hub = fleet[0]
    r = hub.cli("alerts", "rule", "set", "new-rule", "--threshold", "1", check=False)
    assert r.returncode != 0 and "give at least --metric and --threshold" in r.stderr
    r = hub.cli(
        "alerts",
        "rule",
        "set",
        "bad",
        "--metric",
        "error_rate",
        "--threshold",
        "0.01",
        "--clear-threshold",
        "0.5",
        check=False,
    )
    assert r.returncode != 0 and "could never resolve" in r.stderr
    out = hub.cli(
        "alerts",
        "rule",
        "set",
        "fraud-drift",
        "--metric",
        "drift_psi",
        "--threshold",
        "0.3",
        "--model",
        "fraud",
        "--retrain",
    )
    assert "fraud-drift: drift_psi > 0.3" in out
    listed = {r["name"]: r for r in json.loads(hub.cli("alerts", "ls", "--json"))["rules"]}
    assert listed["fraud-drift"]["no_data"] == ""  # agents report drift: it is measured
    assert listed["latency-p99"]["builtin"] is True
    hub.cli("alerts", "rule", "rm", "fraud-drift")
    assert "default is in force" in hub.cli("alerts", "rule", "rm", "error-rate")
    r = hub.cli("alerts", "rule", "rm", "error-rate", check=False)
    assert r.returncode != 0 and "built in" in r.stderr


def test_webhook_secret_from_standard_input(fleet, tmp_path: Path) -> None:
    import subprocess
    import sys

    hub = fleet[0]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelfleet.hub.cli",
            "--data",
            str(hub.data),
            "webhooks",
            "add",
            "stdin-hook",
            "https://hooks.example/x",
        ],
        input=SECRET,
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    hub.cli("webhooks", "rm", "stdin-hook")
