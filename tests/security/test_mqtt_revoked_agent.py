"""Issue 12, item 8: a revoked agent cannot complete the TLS handshake with the MQTT broker.

A real Mosquitto configured by `modelfleet-hub mqtt-config`, a real hub bridged to it and two
real agents over MQTT. After `agents revoke`, the hub writes a new CRL next to the broker's
configuration and sends the broker SIGHUP: the revoked agent's handshake fails, the other agent
keeps working. The CRL's nextUpdate is short here, so the test also shows the hub re-issuing it
before it lapses (a lapsed CRL would make the broker refuse every client).
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests import models
from tests.procs import AgentProcess, BrokerProcess, HubProcess, enroll_agent, wait_for
from tests.test_mqtt import FAST, active, agent_id

CRL_LIFETIME_S = 4.0


def handshake(broker: BrokerProcess, ident: Path) -> str:
    """'ok' when the broker accepts the identity's TLS handshake and MQTT CONNECT, else why not."""
    ctx = ssl.create_default_context(cafile=str(ident / "ca.crt"))
    ctx.load_cert_chain(ident / "agent.crt", ident / "agent.key")
    try:
        with (
            socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            # MQTT 3.1.1 CONNECT, clean session, keepalive 10 s, empty client id.
            tls.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 0]))
            connack = tls.recv(4)
    except (OSError, ssl.SSLError) as exc:
        return f"refused: {exc}"
    return "ok" if connack[:2] == b"\x20\x02" and connack[3:4] == b"\x00" else f"{connack!r}"


def serial(ident: Path) -> int:
    return x509.load_pem_x509_certificate((ident / "agent.crt").read_bytes()).serial_number


def revoked_serials(broker: BrokerProcess) -> set[int]:
    crl = x509.load_pem_x509_crl((broker.out / "crl.pem").read_bytes())
    return {r.serial_number for r in crl}


def crl_next_update(broker: BrokerProcess) -> float:
    crl = x509.load_pem_x509_crl((broker.out / "crl.pem").read_bytes())
    return crl.next_update_utc.timestamp()


def test_revoked_agent_cannot_connect_to_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELFLEET_HUB_CRL_LIFETIME_S", str(CRL_LIFETIME_S))
    monkeypatch.setenv("MODELFLEET_HUB_REFRESH_INTERVAL_S", "0.5")
    (tmp_path / "hub").mkdir()
    broker = BrokerProcess(tmp_path / "hub", tmp_path / "broker")
    hub: HubProcess | None = None
    agents: list[AgentProcess] = []
    try:
        broker.configure().start()
        hub = HubProcess(
            tmp_path / "hub", "--mqtt", broker.address, log_path=tmp_path / "hub.log"
        ).start()
        wait_for(lambda: "connected to MQTT broker" in hub.logs(), 30, "hub on MQTT")
        for name in ("edge-a", "edge-b"):
            data = tmp_path / name
            enroll_agent(hub, data, "site=berlin", hostname=name, transport="mqtt")
            agents.append(
                AgentProcess(
                    data,
                    fleet_config=data / "agent.toml",
                    env=FAST,
                    log_path=tmp_path / f"{name}.log",
                ).start()
            )
        a, b = agents
        ident_a, ident_b = a.models / "identity", b.models / "identity"
        hub.cli("publish", "mlp", str(models.mlp(tmp_path / "m0.onnx", seed=0)))
        hub.cli("deploy", "mlp", "1")
        wait_for(lambda: active(a) == 1 and active(b) == 1, 60, "v1 on both agents over MQTT")
        assert handshake(broker, ident_a) == "ok" and handshake(broker, ident_b) == "ok"

        hub.cli("agents", "revoke", agent_id(hub, "edge-a"))
        wait_for(
            lambda: handshake(broker, ident_a).startswith("refused"),
            10,
            "agent A refused by the broker",
        )
        # Refused for its revoked certificate (the client sees the broker's "certificate
        # revoked" alert, or only the closed connection when the broker closes first).
        assert revoked_serials(broker) == {serial(ident_a)}
        # The broker writes its log line when it gets to it: wait for it, boundedly.
        wait_for(lambda: "certificate verify failed" in broker.logs(), 10, "the broker's refusal")
        assert handshake(broker, ident_b) == "ok"
        assert "reloaded" in hub.logs() and "1 revoked certificate(s)" in hub.logs()
        # Its connection from before the revocation is closed too, and it cannot come back.
        wait_for(lambda: "disconnected from MQTT broker" in a.logs(), 15, "agent A disconnected")
        assert "closed the broker session of revoked" in hub.logs()

        # The other agent keeps working over the broker: a new version reaches it.
        hub.cli("publish", "mlp", str(models.mlp(tmp_path / "m1.onnx", seed=1)))
        hub.cli("deploy", "mlp", "2")
        wait_for(lambda: active(b) == 2, 60, "v2 on agent B over MQTT")

        # Past the first CRLs' nextUpdate: the hub has issued new ones, so the broker still
        # accepts B (a lapsed CRL fails every handshake) and still refuses A.
        first = crl_next_update(broker)
        wait_for(lambda: time.time() > first + 1, CRL_LIFETIME_S + 5, "the first CRL to lapse")
        assert crl_next_update(broker) > time.time()
        assert handshake(broker, ident_b) == "ok"
        assert handshake(broker, ident_a).startswith("refused")
        assert revoked_serials(broker) == {serial(ident_a)}
    finally:
        for agent in agents:
            agent.stop()
        if hub is not None:
            hub.stop()
        broker.stop()
