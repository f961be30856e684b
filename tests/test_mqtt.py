"""MQTT transport through a real Mosquitto started with the generated configuration."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import ssl
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from google.protobuf.json_format import MessageToDict
from paho.mqtt.enums import CallbackAPIVersion

from modelfleet.kernel import mqtt_topics as t
from modelfleet.kernel.identity import load_certificate
from modelfleet.kernel.mqtt_client import make_client, publish_properties
from modelfleet.protos import fleet_pb2 as pb
from tests import models
from tests.procs import (
    AgentProcess,
    BrokerProcess,
    HubProcess,
    agent_status,
    enroll_agent,
    hub_admin,
    wait_for,
)

FAST = {"MODELFLEET_AGENT_REPORT_INTERVAL_S": "1", "MODELFLEET_AGENT_RESYNC_INTERVAL_S": "5"}


@pytest.fixture
def mqtt_fleet(tmp_path: Path):
    class Fleet:
        def __init__(self) -> None:
            self.broker = BrokerProcess(tmp_path / "hub", tmp_path / "broker")
            self.hub: HubProcess | None = None
            self.agents: list[AgentProcess] = []

        def start(self) -> Fleet:
            (tmp_path / "hub").mkdir()
            self.broker.configure().start()
            self.hub = HubProcess(
                tmp_path / "hub", "--mqtt", self.broker.address, log_path=tmp_path / "hub.log"
            ).start()
            wait_for(lambda: "connected to MQTT broker" in self.hub.logs(), 30, "hub on MQTT")
            return self

        def restart_hub(self, *extra: str) -> HubProcess:
            assert self.hub is not None
            old = self.hub
            old.stop()
            self.hub = HubProcess(
                old.data, "--mqtt", self.broker.address, *extra, log_path=tmp_path / "hub-again.log"
            )
            self.hub.port, self.hub.enroll_port, self.hub.url = old.port, old.enroll_port, old.url
            self.hub.start()
            wait_for(lambda: "connected to MQTT broker" in self.hub.logs(), 30, "hub on MQTT")
            return self.hub

        def agent(
            self, name: str, transport: str = "mqtt", env: dict | None = None
        ) -> AgentProcess:
            assert self.hub is not None
            data = tmp_path / name
            enroll_agent(self.hub, data, "site=berlin", hostname=name, transport=transport)
            return self.start_agent(data, env)

        def start_agent(self, data: Path, env: dict | None = None) -> AgentProcess:
            a = AgentProcess(
                data,
                fleet_config=data / "agent.toml",
                env={**FAST, **(env or {})},
                log_path=tmp_path / f"{data.name}-{len(self.agents)}.log",
            )
            self.agents.append(a.start())
            return a

        def model(self, seed: int) -> Path:
            return models.mlp(tmp_path / "onnx" / f"m{seed}.onnx", seed=seed)

    f = Fleet()
    yield f.start()
    for a in f.agents:
        a.stop()
    if f.hub is not None:
        f.hub.stop()
    f.broker.stop()


def active(agent: AgentProcess) -> int:
    try:
        return int(agent_status(agent.admin_socket).get("mlp", {}).get("active_version", 0))
    except Exception:
        return -1


def agent_info(hub: HubProcess, host: str) -> dict:
    resp = hub_admin(hub).ListAgents(pb.ListAgentsRequest(), timeout=10)
    for a in resp.agents:
        if a.hostname == host:
            return MessageToDict(a, preserving_proto_field_name=True)
    raise KeyError(host)


def agent_id(hub: HubProcess, host: str) -> str:
    return agent_info(hub, host)["agent_id"]


def test_deploy_and_download_over_mqtt_only(mqtt_fleet) -> None:
    hub = mqtt_fleet.hub
    agent = mqtt_fleet.agent("edge-1", transport="mqtt")
    assert 'transport = "mqtt"' in (agent.models / "agent.toml").read_text()
    hub.cli("publish", "mlp", str(mqtt_fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1 over MQTT")
    hub.cli("publish", "mlp", str(mqtt_fleet.model(1)))
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 60, "v2 over MQTT")
    # Reports travel over MQTT too; presence comes from the retained online message.
    wait_for(
        lambda: (
            agent_info(hub, "edge-1").get("report", {}).get("models", [{}])[0].get("active_version")
            == "2"
        ),
        30,
        "report over MQTT",
    )
    assert agent_info(hub, "edge-1")["presence"] == "online"
    assert "connected to MQTT broker" in agent.logs()
    assert "fetched and verified mlp v2" in agent.logs()


def test_both_mqtt_notifications_and_grpc_bytes(mqtt_fleet) -> None:
    hub = mqtt_fleet.hub
    agent = mqtt_fleet.agent("edge-2", transport="both")
    hub.cli("publish", "mlp", str(mqtt_fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1 (MQTT notification, gRPC bytes)")


def _client(ident: Path, client_id: str) -> mqtt.Client:
    return make_client(client_id, ident / "ca.crt", ident / "agent.crt", ident / "agent.key")


def test_acl_confines_each_agent_to_its_subtree(mqtt_fleet) -> None:
    hub = mqtt_fleet.hub
    a = mqtt_fleet.agent("agent-a")
    b = mqtt_fleet.agent("agent-b")
    hub.cli("publish", "mlp", str(mqtt_fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(a) == 1 and active(b) == 1, 60, "both on v1")
    b_ident = f"agent:{agent_id(hub, 'agent-b')}"
    # Agent A's own certificate, in a second connection.
    client = _client(a.models / "identity", "intruder-test")
    results: dict[str, object] = {}
    got_messages: list[str] = []
    done = threading.Event()

    a_ident = f"agent:{agent_id(hub, 'agent-a')}"

    def on_connect(c, _u, _f, reason, _p):
        results["connect"] = reason
        # B's retained desired state exists; a control subscription to A's own proves that
        # retained messages do reach this connection.
        c.subscribe([(t.topic(b_ident, t.DESIRED), 1), (t.topic(a_ident, t.DESIRED), 1)])

    def on_subscribe(c, _u, _mid, reasons, _p):
        results["suback"] = reasons
        info = c.publish(t.topic(b_ident, t.STATE), b"forged", qos=1)
        results["pub_mid"] = info.mid

    def on_publish(c, _u, mid, reason, _p):
        results["puback"] = reason
        done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = lambda _c, _u, msg: got_messages.append(msg.topic)
    host, port = mqtt_fleet.broker.address.split(":")
    client.connect(host, int(port))
    client.loop_start()
    try:
        assert done.wait(20), results
        time.sleep(1.0)
    finally:
        client.disconnect()
        client.loop_stop()
    assert not results["connect"].is_failure
    # Reading B's subtree: Mosquitto checks read access per message, so B's retained desired
    # state never arrives, while A's own does.
    assert got_messages == [t.topic(a_ident, t.DESIRED)], got_messages
    # Writing into B's subtree: refused with "Not authorized" (0x87) in the PUBACK.
    assert results["puback"].value == 0x87, results["puback"]
    assert "report from" not in hub.logs() and "undecodable" not in hub.logs()
    # B was not disturbed.
    assert active(b) == 1


def test_client_without_certificate_is_refused(mqtt_fleet) -> None:
    hub = mqtt_fleet.hub
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="anonymous",
        protocol=mqtt.MQTTv5,
    )
    client.tls_set(ca_certs=str(hub.data / "mqtt" / "ca.crt"))
    host, port = mqtt_fleet.broker.address.split(":")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        client.connect(host, int(port))
        # TLS 1.3 may only report the refusal when the first packet is read.
        for _ in range(20):
            rc = client.loop(timeout=0.2)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                raise ConnectionError(f"refused: {rc}")
    # Plain TCP without TLS is refused too.
    plain = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="plain", protocol=mqtt.MQTTv5
    )
    connected = threading.Event()
    plain.on_connect = lambda *a: connected.set()
    try:
        plain.connect(host, int(port))
        for _ in range(10):
            plain.loop(timeout=0.2)
    except OSError:
        pass
    assert not connected.is_set()


def test_broker_restart_mid_deploy_converges(mqtt_fleet) -> None:
    hub = mqtt_fleet.hub
    agent = mqtt_fleet.agent("edge-1")
    hub.cli("publish", "mlp", str(mqtt_fleet.model(0)))
    hub.cli("publish", "mlp", str(mqtt_fleet.model(1)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    mqtt_fleet.broker.kill()
    hub.cli("deploy", "mlp", "2")  # the desired change happens while the broker is down
    time.sleep(1)
    assert active(agent) == 1
    mqtt_fleet.broker.start()
    wait_for(lambda: active(agent) == 2, 90, "v2 after the broker is back")
    wait_for(
        lambda: (
            agent_info(hub, "edge-1").get("report", {}).get("models", [{}])[0].get("active_version")
            == "2"
        ),
        60,
        "report after restart",
    )


def test_mqtt_agent_renews_its_certificate_through_the_broker(mqtt_fleet) -> None:
    # Agent certificates live 16 s; renewal 10 s ahead (see test_fleet.py for the gRPC path).
    hub = mqtt_fleet.restart_hub("--agent-cert-lifetime-s", "16")
    agent = mqtt_fleet.agent("edge-1", env={"MODELFLEET_AGENT_CERT_RENEW_BEFORE_S": "10"})
    ident = agent.models / "identity"
    first = load_certificate((ident / "agent.crt").read_bytes())
    hub.cli("publish", "mlp", str(mqtt_fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1")
    wait_for(lambda: "renewed the agent certificate" in agent.logs(), 30, "a renewal over MQTT")
    assert load_certificate((ident / "agent.crt").read_bytes()).serial_number != first.serial_number
    first_end = first.not_valid_after_utc.timestamp()
    wait_for(
        lambda: float(agent_info(hub, "edge-1")["cert_expires_at"]) > first_end,
        10,
        "the new expiry reported over MQTT",
    )
    # Past the first certificate's end, the broker restarts: the agent must connect again, and
    # can only with the renewed certificate.
    deadline = first.not_valid_after_utc.timestamp() + 1
    wait_for(lambda: time.time() > deadline, 30, "the first certificate to expire")
    mqtt_fleet.broker.kill()
    mqtt_fleet.broker.start()
    hub.cli("publish", "mlp", str(mqtt_fleet.model(1)))
    hub.cli("deploy", "mlp", "2")
    wait_for(lambda: active(agent) == 2, 90, "v2 after the broker restart")
    assert agent.logs().count("connected to MQTT broker") >= 2


def test_last_will_marks_agent_offline_then_online(mqtt_fleet) -> None:
    hub = mqtt_fleet.hub
    agent = mqtt_fleet.agent("edge-1")
    wait_for(lambda: agent_info(hub, "edge-1")["presence"] == "online", 30, "online")
    agent.kill()  # no goodbye: the broker publishes the last will after the keepalive lapses
    wait_for(lambda: agent_info(hub, "edge-1")["presence"] == "offline", 90, "offline")
    assert "OFFLINE (last will)" in hub.logs()
    mqtt_fleet.start_agent(agent.models)
    wait_for(lambda: agent_info(hub, "edge-1")["presence"] == "online", 30, "online again")


def test_telemetry_over_mqtt_exact_through_a_hub_restart(mqtt_fleet, tmp_path: Path) -> None:
    from tests.test_telemetry import fleet_metrics, infer, outbox_requests

    hub = mqtt_fleet.hub
    data = tmp_path / "edge-t"
    enroll_agent(hub, data, "site=berlin", hostname="edge-t", transport="mqtt")
    env = {**FAST, "MODELFLEET_AGENT_TELEMETRY_INTERVAL_S": "0.5"}
    agent = AgentProcess(
        data, fleet_config=data / "agent.toml", env=env, log_path=tmp_path / "edge-t.log"
    )
    mqtt_fleet.agents.append(agent.start())
    hub.cli("publish", "mlp", str(mqtt_fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1 over MQTT")
    infer(agent, 40, 4)
    wait_for(lambda: fleet_metrics(hub)[:2] == (44, 4), 60, "44 requests over MQTT")
    # Acks come back on telemetry/ack (the ACL lets the agent read it): the outbox drains.
    wait_for(lambda: outbox_requests(data) == 0, 30, "outbox drained by MQTT acks")
    # The hub goes away; the broker keeps its persistent session's messages meanwhile, the agent
    # resends what stays unacked, and the restarted hub stores each report once.
    hub.stop()
    infer(agent, 20, 2)
    time.sleep(2)
    again = HubProcess(
        hub.data, "--mqtt", mqtt_fleet.broker.address, log_path=tmp_path / "hub-again.log"
    )
    again.port, again.enroll_port, again.url = hub.port, hub.enroll_port, hub.url
    mqtt_fleet.hub = again.start()
    wait_for(lambda: fleet_metrics(again)[:2] == (66, 6), 60, "66 after the hub restart")
    time.sleep(2)
    assert fleet_metrics(again)[:2] == (66, 6)


def test_job_runs_from_an_mqtt_agent_reach_the_hub_also_after_its_outage(
    mqtt_fleet, tmp_path: Path
) -> None:
    """Job runs ride the durable telemetry outbox: MQTT-only agents report them, and runs that
    end while the hub is down arrive once it is back."""
    from tests.test_jobs import runs, write_input

    hub = mqtt_fleet.hub
    agent = mqtt_fleet.agent("edge-j", transport="mqtt")
    hub.cli("publish", "mlp", str(mqtt_fleet.model(0)))
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1 over MQTT")
    data = tmp_path / "data"
    write_input(data, 200)
    hub.cli(
        "jobs",
        "create",
        "nightly",
        "--model",
        "mlp",
        "--deployed",
        "--every",
        "2s",
        "--input",
        str(data),
        "--output",
        str(tmp_path / "scores"),
        "--keys",
        "id",
    )
    wait_for(
        lambda: any(r["status"] == "succeeded" for r in runs(hub, "nightly")),
        60,
        "a run reported over MQTT",
    )
    run = next(r for r in runs(hub, "nightly") if r["status"] == "succeeded")
    assert run["rows_out"] == 200 and run["agent_id"].startswith("edge-j")

    def finished() -> list[str]:
        return re.findall(r"job nightly run (\w+) succeeded", agent.logs())

    hub.stop()
    before = len(finished())
    wait_for(lambda: len(finished()) >= before + 2, 30, "runs while the hub is down")
    offline = set(finished()[before:])
    again = HubProcess(
        hub.data, "--mqtt", mqtt_fleet.broker.address, log_path=tmp_path / "hub-again.log"
    )
    again.port, again.enroll_port, again.url = hub.port, hub.enroll_port, hub.url
    mqtt_fleet.hub = again.start()
    wait_for(
        lambda: offline <= {r["run_id"] for r in runs(again, "nightly")},
        60,
        "the runs from the outage at the hub",
    )
    stored = [r["run_id"] for r in runs(again, "nightly")]
    assert len(stored) == len(set(stored))  # resent batches are stored once


# -- inference capture shipped through the broker (docs/monitoring.md#inference-capture) ---------
# First the attacker: a second connection under one agent's certificate tries to store a capture
# file as another agent (the broker refuses it), and the same message on its own topics stores
# the file under its own id only. Then an agent with transport = "mqtt" captures every request;
# its files reach the hub in 4 KiB chunk messages and answer `capture query`; the hub is killed
# with -9 mid-upload and the broker dropped mid-upload, each upload resumes from the hub's
# partial copy, and no row is stored twice.

CAPTURE_WIDTH = 256  # random floats: a row of about 1 KiB, files of many 4 KiB chunks


def _part(model: str, file_id: str, data: bytes, offset: int = 0) -> bytes:
    header = pb.CaptureFile(
        model=model,
        file_id=file_id,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        offset=offset,
    )
    return pb.CapturePart(file=header, data=data[offset:]).SerializeToString()


def test_an_agent_cannot_upload_capture_files_as_another(mqtt_fleet, tmp_path: Path) -> None:
    hub = mqtt_fleet.hub
    for name in ("agent-a", "agent-b"):
        labels = f"site=berlin,cap={name}"
        enroll_agent(hub, tmp_path / name, labels, hostname=name, transport="mqtt")
    # The hub takes capture files only of a model deployed to the uploading agent.
    hub.cli("publish", "capm", str(models.mlp(tmp_path / "capm.onnx")))
    hub.cli("deploy", "capm", "1", "--selector", "cap=agent-a")
    a_ident = f"agent:{agent_id(hub, 'agent-a')}"
    b_ident = f"agent:{agent_id(hub, 'agent-b')}"
    ident = tmp_path / "agent-a" / "identity"
    client = make_client(
        "intruder-test", ident / "ca.crt", ident / "agent.crt", ident / "agent.key"
    )
    data = b"PAR1" + secrets.token_bytes(3000) + b"PAR1"
    forged = _part("capm", "1-forged", data)
    own = _part("capm", "2-own", data)
    # A's own topic, but a model never deployed to A: the hub refuses it, writing nothing.
    not_its_own = _part("m", "3-not-its-own", data)
    pubacks: dict[int, object] = {}
    answers: list[tuple[bytes, dict]] = []
    subscribed = threading.Event()
    answered = threading.Event()

    client.on_connect = lambda c, *_: c.subscribe(t.topic(a_ident, t.FETCH_RESPONSE), qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_publish = lambda _c, _u, mid, reason, _p: pubacks.__setitem__(mid, reason)

    def on_message(_c, _u, msg: mqtt.MQTTMessage) -> None:
        user = dict(getattr(msg.properties, "UserProperty", []) or [])
        answers.append((bytes(msg.payload), user))
        answered.set()

    client.on_message = on_message
    host, port = mqtt_fleet.broker.address.split(":")
    client.connect(host, int(port))
    client.loop_start()
    try:
        assert subscribed.wait(20)

        def send(identity: str, payload: bytes) -> int:
            props = publish_properties(
                secrets.token_bytes(12),
                t.topic(a_ident, t.FETCH_RESPONSE),
                **{t.PROP_KIND: t.KIND_CAPTURE},
            )
            info = client.publish(t.topic(identity, t.FETCH_REQUEST), payload, 1, properties=props)
            return info.mid

        # Into B's subtree, with A's certificate: the broker refuses it ("Not authorized").
        forged_mid = send(b_ident, forged)
        wait_for(lambda: forged_mid in pubacks, 20, "the broker's answer to the forged chunk")
        assert pubacks[forged_mid].value == 0x87, pubacks[forged_mid]
        # The control: the same kind of message on A's own topic is taken, and stored as A's.
        own_mid = send(a_ident, own)
        assert answered.wait(20), "no answer from the hub to A's own chunk"
        wait_for(lambda: own_mid in pubacks, 20, "the broker's answer to A's own chunk")
        assert pubacks[own_mid].value == 0
        answered.clear()
        send(a_ident, not_its_own)
        assert answered.wait(20), "no answer from the hub to A's chunk of a model it lacks"
    finally:
        client.disconnect()
        client.loop_stop()
    payload, user = answers[0]
    assert t.PROP_ERROR not in user, user
    state = pb.CaptureFileState.FromString(pb.Chunk.FromString(payload).data)
    assert (state.have, state.stored) == (len(data), True)
    root = hub.data / "capture"
    stored = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert stored == [f"capm/{a_ident.split(':', 1)[1]}/2-own.parquet"], stored
    _, user = answers[1]
    error = user.get(t.PROP_ERROR, "")
    assert error.startswith("permission_denied:capture upload refused: model 'm'"), user
    assert (root / stored[0]).read_bytes() == data


def _captured_m(agent: AgentProcess) -> int:
    m = re.search(
        r'modelfleet_capture_requests_total\{model="m",outcome="captured"\} (\S+)',
        agent.metrics(),
    )
    return int(float(m.group(1))) if m else 0


def _query_m(hub: HubProcess, sql: str) -> list[dict]:
    return json.loads(hub.cli("capture", "query", "m", sql, "--json"))


def _partials(hub: HubProcess) -> set[str]:
    """Ids of the files the hub holds part of (some bytes, not all)."""
    return {
        p.stem for p in (hub.data / "capture" / ".partial").rglob("*.part") if p.stat().st_size > 0
    }


def _stored_ids(hub: HubProcess) -> set[str]:
    return {p.stem for p in (hub.data / "capture" / "m").glob("*/*.parquet")}


def test_mqtt_agent_ships_captures_resuming_after_hub_kill_and_broker_drop(
    mqtt_fleet, tmp_path: Path
) -> None:
    hub = mqtt_fleet.hub
    env = {
        "MODELFLEET_AGENT_BACKOFF_MAX_S": "1",
        "MODELFLEET_AGENT_CAPTURE_ROTATE_S": "2",
        "MODELFLEET_AGENT_CAPTURE_SHIP_INTERVAL_S": "0.3",
        "MODELFLEET_AGENT_CAPTURE_MQTT_CHUNK_BYTES": "4096",
    }
    agent = mqtt_fleet.agent("edge-c", transport="mqtt", env=env)
    hub.cli("publish", "m", str(models.mlp(tmp_path / "m.onnx", inputs=CAPTURE_WIDTH)))
    hub.cli("deploy", "m", "1")
    wait_for(lambda: _active_m(agent) == 1, 90, "m v1 over MQTT")
    hub.cli("capture", "set", "m", "--rate", "100")
    stop = threading.Event()
    sent = [0]
    rng = np.random.default_rng(0)

    def load() -> None:
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(agent.url) as c:
            while not stop.is_set():
                x = grpcclient.InferInput("x", [1, CAPTURE_WIDTH], "FP32")
                x.set_data_from_numpy(rng.random((1, CAPTURE_WIDTH), dtype=np.float32))
                c.infer("m", [x], request_id=f"req-{sent[0]}")
                sent[0] += 1
                time.sleep(0.02)  # a few dozen requests/s: files of tens of 4 KiB chunks

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        wait_for(lambda: bool(list((hub.data / "capture" / "m").glob("*/*.parquet"))), 90, "a file")
        assert _query_m(hub, "SELECT count(*) AS n FROM capture")[0]["n"] > 0
        # kill -9 of the hub while it holds part of a file.
        wait_for(lambda: bool(_partials(hub)), 60, "an upload in progress at the hub")
        cut = _partials(hub)
        hub.kill()
        if mqtt_fleet.broker.proc.poll() is not None:
            # Mosquitto 2.0.11 (Debian 12) can abort ("double free") when a client dies with
            # QoS 1 messages in flight to it; the fleet then also rides out a broker restart.
            mqtt_fleet.broker.start()
        again = HubProcess(
            hub.data, "--mqtt", mqtt_fleet.broker.address, log_path=tmp_path / "hub-again.log"
        )
        again.port, again.enroll_port, again.url = hub.port, hub.enroll_port, hub.url
        mqtt_fleet.hub = hub = again.start()
        wait_for(lambda: "resumed at byte" in hub.logs(), 90, "an upload resumed after the kill")
        wait_for(lambda: cut <= _stored_ids(hub), 90, "the files cut by the kill stored")
        # The broker goes away mid-upload of another file and comes back. paho sends the chunk
        # in flight again on reconnecting, or the agent asks the hub where it is: either way
        # the upload goes on from the hub's partial copy (a chunk from 0 would not be taken).
        wait_for(lambda: bool(_partials(hub) - cut), 60, "another upload in progress")
        cut = _partials(hub)
        mqtt_fleet.broker.kill()
        time.sleep(1)
        mqtt_fleet.broker.start()
        # After a broker restart chunks once went at about one a second here (cause not found;
        # docs/monitoring.md): the traffic stops so the backlog stays small.
        stop.set()
        wait_for(lambda: cut <= _stored_ids(hub), 180, "the files cut by the broker stored")
    finally:
        stop.set()
        loader.join(30)
    assert sent[0] > 0
    folder = tmp_path / "edge-c" / "capture" / "m"

    def all_shipped() -> bool:
        return not list(folder.glob("*.parquet*")) and _query_m(
            hub, "SELECT count(*) AS n FROM capture"
        )[0]["n"] == _captured_m(agent)

    wait_for(all_shipped, 180, "every captured row at the hub", interval=0.5)
    rows = _query_m(hub, "SELECT count(*) AS n, count(DISTINCT request_id) AS d FROM capture")[0]
    assert rows["n"] == rows["d"] > 0, "a captured row reached the hub twice"
    assert rows["n"] == _captured_m(agent)
    ids = [f.stem for f in (hub.data / "capture" / "m").glob("*/*.parquet")]
    assert len(ids) == len(set(ids)) > 1
    assert not list((hub.data / "capture" / ".partial").rglob("*.part"))


def _active_m(agent: AgentProcess) -> int:
    try:
        return int(agent_status(agent.admin_socket).get("m", {}).get("active_version", 0))
    except Exception:
        return -1
