"""Issue 12, item 7: the inference port's TLS, mutual TLS and bearer token, against a real agent
process and tritonclient.grpc.

The attacker here is anyone who can reach the agent's inference port: without TLS they read and
alter traffic, without client authentication they use (and see the metadata of) every model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from modelfleet.hub.ca import CertificateAuthority
from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.kernel.identity import generate_key, write_pem, write_private_key
from tests.conftest import make_mlp_bundle
from tests.procs import ROOT, AgentProcess, HubProcess, enroll_agent, wait_for

TOKEN = "s3cret-inference-token-0123456789abcdef"


class Pki:
    """Two unrelated CAs; a server certificate for 127.0.0.1 and a client certificate from each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = CertificateAuthority.load_or_create(root / "ca1", name="test inference CA")
        self.other = CertificateAuthority.load_or_create(root / "ca2", name="someone else's CA")
        self.server_cert, self.server_key = self.pair(
            "server", self.ca, "inference-server", server=True, hostnames=["127.0.0.1"]
        )
        self.client_cert, self.client_key = self.pair("client", self.ca, "app", server=False)
        self.foreign_cert, self.foreign_key = self.pair("foreign", self.other, "app", server=False)

    def pair(
        self,
        stem: str,
        ca: CertificateAuthority,
        cn: str,
        *,
        server: bool,
        hostnames: tuple[str, ...] | list[str] = (),
    ) -> tuple[Path, Path]:
        key = generate_key()
        cert = ca.issue_for_key(key.public_key(), cn, server=server, hostnames=hostnames)
        write_private_key(self.root / f"{stem}.key", key)
        write_pem(self.root / f"{stem}.crt", cert)
        return self.root / f"{stem}.crt", self.root / f"{stem}.key"

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem


def client(
    agent: AgentProcess,
    *,
    root: bytes | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    channel_args: list | None = None,
) -> grpcclient.InferenceServerClient:
    if root is None:
        return grpcclient.InferenceServerClient(agent.url)
    # tritonclient takes file paths for its TLS material.
    root_path = agent.models.parent / f"root-{abs(hash(root))}.pem"
    root_path.write_bytes(root)
    return grpcclient.InferenceServerClient(
        agent.url,
        ssl=True,
        root_certificates=str(root_path),
        private_key=str(key) if key else None,
        certificate_chain=str(cert) if cert else None,
        channel_args=channel_args,
    )


def infer_ok(c: grpcclient.InferenceServerClient, headers: dict | None = None) -> None:
    inp = grpcclient.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    result = c.infer("mlp", [inp], headers=headers, client_timeout=10)
    assert result.as_numpy("y").shape == (1, 3)


def refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, client_timeout=5, **kwargs)
    return info.value


def wait_ready(agent: AgentProcess, timeout: float = 60.0) -> None:
    """Readiness from the log: the readiness RPCs themselves may need TLS or a token."""

    deadline = time.monotonic() + timeout
    while "READY (" not in agent.logs():
        if agent.proc is None or agent.proc.poll() is not None:
            raise RuntimeError(f"agent exited early:\n{agent.logs()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"agent not READY after {timeout}s:\n{agent.logs()[-4000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inference-auth") / "repo"
    make_mlp_bundle(path, 1)
    return path


@pytest.fixture
def start(repo: Path, tmp_path: Path):
    started: list[AgentProcess] = []

    def run(*extra: str) -> AgentProcess:
        # Each agent its own copy of the repository's parent: admin sockets and logs stay apart.
        agent = AgentProcess(repo, *extra, log_path=tmp_path / f"agent{len(started)}.log")
        agent.admin_socket = tmp_path / f"agent{len(started)}.sock"
        agent.args[agent.args.index("--admin-socket") + 1] = str(agent.admin_socket)
        started.append(agent)
        agent.start()
        wait_ready(agent)
        return agent

    yield run
    for agent in started:
        agent.stop()


def test_default_stays_plaintext_without_authentication(start, pki: Pki) -> None:
    agent = start()
    with client(agent) as c:
        assert c.is_server_live(client_timeout=5)
        infer_ok(c)
    with client(agent, root=pki.ca_pem) as c:
        assert refused(c.is_server_live).status() == "StatusCode.UNAVAILABLE"
    assert "TLS" not in agent.logs().split("listening on")[-1].splitlines()[0]


def test_plaintext_client_is_refused_on_a_tls_port(start, pki: Pki) -> None:
    agent = start("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    with client(agent) as c:
        assert refused(c.is_server_live).status() == "StatusCode.UNAVAILABLE"
    # The server is verified too: a client trusting another CA does not talk to it.
    with client(agent, root=pki.other.cert_pem) as c:
        assert refused(c.is_server_live).status() == "StatusCode.UNAVAILABLE"
    with client(agent, root=pki.ca_pem) as c:
        assert c.is_server_live(client_timeout=5)
        infer_ok(c)
    assert "TLS" in agent.logs()


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_named_ca(
    start, pki: Pki
) -> None:
    agent = start(
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.root / "ca1" / "ca.crt"),
    )
    with client(agent, root=pki.ca_pem) as c:
        refused(c.is_server_live)
        refused(c.infer, "mlp", [])
    with client(agent, root=pki.ca_pem, cert=pki.foreign_cert, key=pki.foreign_key) as c:
        refused(c.is_server_live)
    with client(agent, root=pki.ca_pem, cert=pki.client_cert, key=pki.client_key) as c:
        assert c.is_server_live(client_timeout=5)
        infer_ok(c)


def test_bearer_token_is_required_on_inference_and_metadata_but_not_health(
    start, pki: Pki, tmp_path: Path
) -> None:
    token_file = tmp_path / "inference.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    agent = start(
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--auth-token-file",
        str(token_file),
    )
    good = {"authorization": f"Bearer {TOKEN}"}
    with client(agent, root=pki.ca_pem) as c:
        bad = (
            None,
            {"authorization": "Bearer wrong-token"},
            {"authorization": TOKEN},
            {"authorization": f"Bearer {TOKEN}x"},
        )
        for headers in bad:
            for call, args in (
                (c.is_server_live, ()),
                (c.get_model_metadata, ("mlp",)),
                (c.get_model_repository_index, ()),
            ):
                err = refused(call, *args, headers=headers)
                assert err.status() == "StatusCode.UNAUTHENTICATED", (headers, err)
                assert "bearer token" in err.message(), err.message()
        assert c.is_server_live(headers=good, client_timeout=5)
        assert c.get_model_metadata("mlp", headers=good, client_timeout=5).name == "mlp"
        infer_ok(c, headers=good)
    # Probes: grpc.health.v1 answers without the token (the connection still needs TLS).
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
    with grpc.secure_channel(agent.url, creds) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    agent.stop()
    assert TOKEN not in agent.logs()
    assert str(token_file) in agent.logs()


def test_token_check_works_on_a_plaintext_loopback_port_and_warns(start, tmp_path: Path) -> None:
    token_file = tmp_path / "inference.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o640)
    agent = start("--auth-token-file", str(token_file))
    with client(agent) as c:
        assert refused(c.is_server_live).status() == "StatusCode.UNAUTHENTICATED"
        infer_ok(c, headers={"authorization": f"bearer {TOKEN}"})
    logs = agent.logs()
    assert "readable by group/others" in logs and "without TLS" in logs
    assert TOKEN not in logs


def test_fleet_agent_serves_with_its_enrolled_identity_and_trusts_the_hub_ca(
    tmp_path: Path, pki: Pki
) -> None:
    hub = HubProcess(tmp_path / "hub", log_path=tmp_path / "hub.log").start()
    agent = None
    try:
        config = enroll_agent(hub, tmp_path / "edge", "site=test", hostname="edge")
        agent_id = tomllib.loads(config.read_text())["agent"]["agent_id"]
        agent = AgentProcess(
            tmp_path / "edge",
            "--tls-agent-identity",
            "--tls-client-ca-hub",
            fleet_config=config,
            log_path=tmp_path / "edge.log",
        )
        agent.start()
        wait_ready(agent)
        hub_ca = (tmp_path / "edge" / "identity" / "ca.crt").read_bytes()
        admin = tmp_path / "hub" / "admin"
        # Clients verify the agent by the name its hub-issued certificate carries.
        name = [("grpc.ssl_target_name_override", f"{agent_id}.agent.modelfleet.internal")]
        with client(
            agent, root=hub_ca, cert=admin / "admin.crt", key=admin / "admin.key", channel_args=name
        ) as c:
            assert c.is_server_live(client_timeout=5)
        with client(
            agent, root=hub_ca, cert=pki.client_cert, key=pki.client_key, channel_args=name
        ) as c:
            refused(c.is_server_live)
        with client(agent, root=hub_ca, channel_args=name) as c:
            refused(c.is_server_live)
        with client(agent) as c:
            refused(c.is_server_live)
        # Another agent's name is not this agent's: the hub CA vouches for who it is.
        other = [("grpc.ssl_target_name_override", "someone-else.agent.modelfleet.internal")]
        with client(
            agent,
            root=hub_ca,
            cert=admin / "admin.crt",
            key=admin / "admin.key",
            channel_args=other,
        ) as c:
            refused(c.is_server_live)
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()


# -- bad settings: each refused at start with a message that names the setting and the fix ------


def load(env: dict[str, str]):
    from modelfleet.agent.config import load_config

    return load_config(None, env=env)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODELFLEET_AGENT_TLS_CERT": "a.crt"}, "tls_cert and tls_key"),
        ({"MODELFLEET_AGENT_TLS_KEY": "a.key"}, "tls_cert and tls_key"),
        ({"MODELFLEET_AGENT_TLS_CLIENT_CA": "ca.crt"}, "need TLS"),
        ({"MODELFLEET_AGENT_TLS_AGENT_IDENTITY": "true"}, "fleet mode"),
        ({"MODELFLEET_AGENT_TLS_CLIENT_CA_HUB": "true"}, "fleet mode"),
        (
            {
                "MODELFLEET_AGENT_HUB": "h:1",
                "MODELFLEET_AGENT_TLS_AGENT_IDENTITY": "1",
                "MODELFLEET_AGENT_TLS_CERT": "a.crt",
                "MODELFLEET_AGENT_TLS_KEY": "a.key",
            },
            "either tls_agent_identity or tls_cert",
        ),
        (
            {
                "MODELFLEET_AGENT_HUB": "h:1",
                "MODELFLEET_AGENT_TLS_AGENT_IDENTITY": "1",
                "MODELFLEET_AGENT_TLS_CLIENT_CA_HUB": "1",
                "MODELFLEET_AGENT_TLS_CLIENT_CA": "c",
            },
            "either tls_client_ca_hub or tls_client_ca",
        ),
    ],
)
def test_inconsistent_tls_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        load(env)


def serve_fails(repo: Path, tmp_path: Path, *extra: str, code: int = 7) -> str:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelfleet.agent.cli",
            "serve",
            "--models",
            str(repo),
            "--listen",
            "127.0.0.1:0",
            "--admin-socket",
            str(tmp_path / "a.sock"),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == code, r.stdout + r.stderr
    return r.stderr


def test_unusable_tls_files_stop_the_agent_with_a_clear_error(
    repo: Path, tmp_path: Path, pki: Pki
) -> None:
    err = serve_fails(
        repo, tmp_path, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)
    )
    assert "does not match" in err and str(pki.client_key) in err
    err = serve_fails(
        repo,
        tmp_path,
        "--tls-cert",
        str(tmp_path / "missing.crt"),
        "--tls-key",
        str(pki.server_key),
    )
    assert "missing.crt" in err and "tls_cert" in err
    # A client certificate is not a server certificate: clients would refuse it.
    err = serve_fails(
        repo, tmp_path, "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)
    )
    assert "serverAuth" in err
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    err = serve_fails(repo, tmp_path, "--auth-token-file", str(empty), code=3)
    assert "empty" in err and str(empty) in err
    short = tmp_path / "short.token"
    short.write_text("abc")
    assert "at least" in serve_fails(repo, tmp_path, "--auth-token-file", str(short), code=3)
    err = serve_fails(repo, tmp_path, "--auth-token-file", str(tmp_path / "nope.token"))
    assert "nope.token" in err and "auth_token_file" in err


def test_key_file_readable_by_others_is_warned_about(start, pki: Pki, tmp_path: Path) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki.server_key.read_bytes())
    os.chmod(loose, 0o644)
    agent = start("--tls-cert", str(pki.server_cert), "--tls-key", str(loose))
    assert f"{loose} is readable by group/others" in agent.logs()
    with client(agent, root=pki.ca_pem) as c:
        assert c.is_server_live(client_timeout=5)


def served_certificate(agent: AgentProcess) -> bytes:
    """The DER certificate a new TLS connection to the agent gets (gRPC insists on ALPN h2)."""
    import socket
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only looking at what is served
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", agent.port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        return tls.getpeercert(binary_form=True)


def test_rotated_certificate_is_served_without_a_restart_once_the_pair_matches(
    start, pki: Pki, tmp_path: Path
) -> None:
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    key.chmod(0o600)
    agent = start("--tls-cert", str(cert), "--tls-key", str(key))
    old = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
    assert served_certificate(agent) == old
    new_cert, new_key = pki.pair(
        "rotated", pki.ca, "inference-server", server=True, hostnames=["127.0.0.1"]
    )
    # Half-way through a rotation (new certificate, old key) the old pair keeps serving.
    os.replace(new_cert, cert)
    assert served_certificate(agent) == old
    wait_for(lambda: "keeping the certificate in use" in agent.logs(), 10, "mismatch logged")
    os.replace(new_key, key)
    new = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
    assert served_certificate(agent) == new
    with client(agent, root=pki.ca_pem) as c:
        infer_ok(c)
    assert "certificate reloaded" in agent.logs()


def test_token_file_is_read_again_on_sighup(start, tmp_path: Path) -> None:
    token_file = tmp_path / "inference.token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    agent = start("--auth-token-file", str(token_file))
    rotated = TOKEN[::-1]
    token_file.write_text(rotated + "\n")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_log("inference token reloaded", timeout=10)
    with client(agent) as c:
        err = refused(c.is_server_live, headers={"authorization": f"Bearer {TOKEN}"})
        assert err.status() == "StatusCode.UNAUTHENTICATED"
        assert c.is_server_live(headers={"authorization": f"Bearer {rotated}"}, client_timeout=5)
    # A token file broken later keeps the token in use.
    token_file.write_text("")
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_log("inference token not reloaded", timeout=10)
    with client(agent) as c:
        assert c.is_server_live(headers={"authorization": f"Bearer {rotated}"}, client_timeout=5)
    assert TOKEN not in agent.logs() and rotated not in agent.logs()
