"""Drift end to end, as real processes: a model published with --reference (Parquet made here),
an agent with 2-second drift windows serving tritonclient traffic in which one feature is
shifted by several standard deviations; `modelfleet-hub drift` shows that feature on top, the
built-in drift-psi rule fires (`alerts ls`) and a real HTTP receiver gets one signed payload
that names the feature and is a retraining trigger."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from modelfleet.hub.webhooks import KEY_HEADER, verify
from tests import models
from tests.procs import AgentProcess, HubProcess, agent_status, enroll_agent, wait_for
from tests.test_bundle_reference import reference_parquet
from tests.webhook_receiver import Receiver

ENV = {
    "MODELFLEET_AGENT_REPORT_INTERVAL_S": "0.5",
    "MODELFLEET_AGENT_BACKOFF_MAX_S": "1",
    "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "1",
    "MODELFLEET_AGENT_DRIFT_WINDOW_S": "2",
}
SECRET = b"a-webhook-secret-for-the-drift-test"
HUB_CONFIG = """[hub]
alert_interval_s = 0.3
webhook_backoff_s = 0.3
webhook_backoff_max_s = 1.0
"""
SHIFTED = 1  # x[1] moves by SHIFT_SD standard deviations
SHIFT_SD = 4.0


# Rows per request: enough that a 2-second window holds a few thousand rows even when a busy
# machine slows the client down (PSI over a few hundred rows is noisy on unshifted data).
ROWS = 16


class Traffic:
    """Requests of ROWS rows drawn like the reference, with x[1] shifted once ``shift`` is
    set."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.shift = 0.0
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import tritonclient.grpc as grpcclient

        rng = np.random.default_rng(12)
        with grpcclient.InferenceServerClient(self.agent.url) as c:
            while not self.stop.is_set():
                x = rng.standard_normal((ROWS, 4)).astype(np.float32)
                x[:, 3] = rng.integers(0, 4, ROWS)
                x[:, SHIFTED] += self.shift
                inp = grpcclient.InferInput("x", [ROWS, 4], "FP32")
                inp.set_data_from_numpy(x)
                with contextlib.suppress(Exception):
                    c.infer("mlp", [inp])
                    self.sent += 1
                time.sleep(0.01)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    root = tmp_path_factory.mktemp("drift")
    (root / "hub.toml").write_text(HUB_CONFIG)
    hub = HubProcess(root / "hub", "--config", str(root / "hub.toml"), log_path=root / "hub.log")
    hub.start()
    agent = None
    traffic = None
    with Receiver() as receiver:
        try:
            config = enroll_agent(hub, root / "a0", "site=berlin", hostname="edge-0")
            agent = AgentProcess(
                root / "a0", fleet_config=config, env=ENV, log_path=root / "a0.log"
            ).start()
            ref = reference_parquet(root / "ref.parquet", rows=2000)
            model = models.mlp(root / "mlp.onnx")
            out = hub.cli("publish", "mlp", str(model), "--reference", str(ref))
            assert "published mlp v1" in out
            hub.cli("deploy", "mlp", "1")
            wait_for(lambda: active(agent) == 1, 120, "mlp v1 on the agent")
            secret_file = root / "secret"
            secret_file.write_bytes(SECRET + b"\n")
            hub.cli("webhooks", "add", "ops", receiver.url, "--secret-file", str(secret_file))
            # The built-in rule (PSI > 0.2), on a time scale a test can wait for.
            hub.cli(
                "alerts",
                "rule",
                "set",
                "drift-psi",
                "--for",
                "1s",
                "--window",
                "10s",
                "--clear-for",
                "2s",
                "--min-requests",
                "20",
            )
            traffic = Traffic(agent)
            traffic.thread.start()
            yield hub, agent, receiver, traffic
        finally:
            if traffic is not None:
                traffic.stop.set()
                traffic.thread.join(10)
            if agent is not None:
                agent.stop()
            hub.stop()


def active(agent: AgentProcess) -> int:
    try:
        return int(agent_status(agent.admin_socket).get("mlp", {}).get("active_version", 0))
    except Exception:
        return -1


def fleet_top(hub: HubProcess, *args: str) -> list[dict]:
    resp = json.loads(hub.cli("drift", "mlp", "--since", "5s", "--json", *args))
    return [f for f in resp.get("fleet", []) if f.get("role") == "input"]


def test_unshifted_traffic_is_reported_and_does_not_drift(fleet) -> None:
    hub, _agent, receiver, _traffic = fleet
    wait_for(lambda: fleet_top(hub), 60, "a drift window at the hub", interval=0.5)
    top = fleet_top(hub)
    assert top[0]["psi_max"] < 0.2, top
    assert not [r for r in receiver.requests if json.loads(r[1])["rule"] == "drift-psi"]
    table = hub.cli("alerts", "ls")
    assert "no data yet: agents do not report drift scores" not in table


def test_a_shifted_feature_tops_drift_and_fires_the_alert_once(fleet) -> None:
    hub, _agent, receiver, traffic = fleet
    traffic.shift = SHIFT_SD

    def shifted_on_top() -> bool:
        top = fleet_top(hub)
        return bool(top) and top[0]["feature"] == f"x[{SHIFTED}]" and top[0]["psi_max"] > 1.0

    wait_for(shifted_on_top, 60, "the shifted feature on top", interval=0.5)
    # The views rank inputs and outputs together: a shifted input may legitimately shift an
    # output as much or more (y = f(x)), so what they promise is the shifted input on top of
    # the inputs, each marked drifted.
    text = hub.cli("drift", "mlp", "--since", "5s", "--top", "10")
    rows = [ln.split() for ln in text.splitlines()[2:]]
    inputs = [r for r in rows if r[3] == "input"]
    assert inputs[0][:4] == ["(fleet)", "1", f"x[{SHIFTED}]", "input"], text
    assert inputs[0][-1] == "drifted", text
    agent_inputs = [r for r in inputs if r[0] != "(fleet)"]
    assert agent_inputs and agent_inputs[0][2] == f"x[{SHIFTED}]", text
    assert agent_inputs[0][-1] == "drifted", text
    by_agent = json.loads(
        hub.cli("drift", "mlp", "--selector", "site=berlin", "--since", "5s", "--json")
    )
    agent_top = [f for f in by_agent["agents"] if f.get("role") == "input"]
    assert agent_top and agent_top[0]["feature"] == f"x[{SHIFTED}]", by_agent
    assert agent_top[0]["psi_max"] > 1.0, by_agent

    def firing() -> list[tuple[dict, bytes]]:
        return [
            (h, raw)
            for h, raw in receiver.requests
            if json.loads(raw)["rule"] == "drift-psi" and json.loads(raw)["state"] == "firing"
        ]

    wait_for(firing, 60, "a firing drift notification", interval=0.2)
    time.sleep(2)  # more evaluations while it keeps firing: nothing more is sent
    [(headers, raw)] = firing()
    body = json.loads(raw)
    assert verify(SECRET, raw, headers, time.time())
    assert headers[KEY_HEADER] == body["idempotency_key"]
    assert (body["model"], body["version"], body["metric"]) == ("mlp", 1, "drift_psi")
    assert body["value"] > 0.2 and body["evidence"]["feature"] == f"x[{SHIFTED}]"
    assert body["retrain"]["reason"].startswith("drift_psi > 0.2")
    listed = json.loads(hub.cli("alerts", "ls", "--json"))
    [alert] = [a for a in listed["alerts"] if a["rule"] == "drift-psi"]
    assert (alert["state"], alert["model"], alert["version"]) == ("firing", "mlp", 1)
    assert any(
        line.split()[:3] == ["firing", "drift-psi", "mlp"]
        for line in hub.cli("alerts", "ls").splitlines()
    )


def test_drift_command_explains_mistakes(fleet) -> None:
    hub = fleet[0]
    r = hub.cli("drift", "mlp", "--agent", "nobody", check=False)
    assert r.returncode == 3 and "no agent with id or hostname 'nobody'" in r.stderr
    r = hub.cli("drift", "mlp", "--selector", "site=paris", check=False)
    assert r.returncode == 3 and "no agent matches the selector site=paris" in r.stderr
    r = hub.cli("drift", "nomodel", check=False)
    assert r.returncode == 4
