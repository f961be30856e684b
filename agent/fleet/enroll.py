"""``modelfleet-agent enroll``: trust the hub's CA by fingerprint, get a certificate for a key
generated here (it never leaves this node), store the TUF root, write the agent's config."""

from __future__ import annotations

import getpass
import os
import socket
import stat
import sys
from pathlib import Path

import grpc

from modelfleet.agent.fleet.renew import discard_pending
from modelfleet.agent.fleet.transport import IDENTITY_DIR, channel_options, rpc_error
from modelfleet.kernel.errors import BundleExistsError
from modelfleet.kernel.identity import (
    EnrollToken,
    TokenError,
    fetch_ca_certificate,
    generate_key,
    make_csr,
    split_host_port,
    write_pem,
    write_private_key,
)
from modelfleet.protos import fleet_pb2 as pb
from modelfleet.protos import fleet_pb2_grpc as pb_grpc

TUF_DIR = "tuf"
# The token in the environment: for containers and orchestrators that hand secrets over that
# way. Unlike the command line, /proc/PID/environ is readable by the same user and root only.
TOKEN_ENV = "MODELFLEET_AGENT_ENROLL_TOKEN"
# Tokens are about 200 characters; anything much larger is the wrong file.
MAX_TOKEN_FILE_BYTES = 16 * 1024


def read_token_file(path: str) -> str:
    """The enrollment token in file ``path``, or on standard input for ``-`` (a terminal is
    asked without echo). The token never passes through the command line."""
    if path == "-":
        if sys.stdin.isatty():
            return getpass.getpass("enrollment token: ")
        raw = sys.stdin.read(MAX_TOKEN_FILE_BYTES + 1)
        where = "standard input"
    else:
        file = Path(path)
        try:
            with file.open("rb") as f:
                data = f.read(MAX_TOKEN_FILE_BYTES + 1)
                mode = os.fstat(f.fileno()).st_mode
        except OSError as exc:
            raise TokenError(f"cannot read token file {path}: {exc.strerror or exc}") from None
        raw = data.decode("utf-8", errors="replace")
        where = f"token file {path}"
        if stat.S_ISREG(mode) and mode & 0o077:
            print(
                f"modelfleet-agent: warning: {where} is readable by group/others (mode "
                f"{mode & 0o777:o}); until the token is used, they could redeem it first",
                file=sys.stderr,
            )
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise TokenError(f"{where} holds more than {MAX_TOKEN_FILE_BYTES} bytes: not a token")
    token = raw.strip()
    if not token:
        raise TokenError(
            f"{where} is empty: put the token from `modelfleet-hub agents token` there"
        )
    if len(token.split()) > 1:
        raise TokenError(f"{where} must hold one token and nothing else")
    return token


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def enroll(
    token_text: str,
    data_dir: Path,
    *,
    listen: str = "127.0.0.1:8001",
    metrics_listen: str = "",
    hostname: str | None = None,
    force: bool = False,
    transport: str = "grpc",
) -> tuple[str, Path]:
    """Returns (agent id, path of the written config file)."""
    data_dir = Path(data_dir).resolve()
    ident = data_dir / IDENTITY_DIR
    if (ident / "agent.crt").exists() and not force:
        raise BundleExistsError(f"{data_dir} is already enrolled (use --force to enroll again)")
    token = EnrollToken.decode(token_text.strip())
    if token.expired():
        raise TokenError(f"enrollment token {token.token_id} has expired")
    host, port = split_host_port(token.hub_address)
    ca_pem = fetch_ca_certificate(host, port, token.ca_fingerprint)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    ident.mkdir(mode=0o700, exist_ok=True)
    # A renewal of the identity being replaced must not be completed later over the new one.
    discard_pending(ident)
    key = generate_key()
    write_private_key(ident / "agent.key", key)
    node = hostname or socket.gethostname()
    # The hub ignores the subject and names the agent itself; this one is only a placeholder.
    csr = make_csr(key, "agent:pending")
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(token.hub_address, creds, options=channel_options()) as channel:
        try:
            resp = pb_grpc.FleetStub(channel).Enroll(
                pb.EnrollRequest(
                    token_id=token.token_id, secret=token.secret, csr_pem=csr, hostname=node
                ),
                timeout=30,
            )
        except grpc.RpcError as exc:
            raise rpc_error(exc, "enrollment") from None
    write_pem(ident / "agent.crt", resp.certificate_pem)
    write_pem(ident / "ca.crt", resp.ca_pem)
    (data_dir / TUF_DIR).mkdir(mode=0o700, exist_ok=True)
    write_pem(data_dir / TUF_DIR / "root.json", resp.tuf_root)
    config = data_dir / "agent.toml"
    lines = [
        "# Written by `modelfleet-agent enroll`; see docs/configuration.md for every key.",
        "[agent]",
        f"agent_id = {_toml_str(resp.agent_id)}",
        f"hub = {_toml_str(resp.hub_address)}",
        f"data = {_toml_str(str(data_dir))}",
        f"listen = {_toml_str(listen)}",
    ]
    if metrics_listen:
        lines.append(f"metrics_listen = {_toml_str(metrics_listen)}")
    if transport != "grpc" and not resp.mqtt_address:
        raise TokenError(f"transport {transport} asked for, but the hub has no MQTT broker")
    if resp.mqtt_address:
        lines.append(f"mqtt = {_toml_str(resp.mqtt_address)}")
    lines.append(f"transport = {_toml_str(transport)}")
    write_pem(config, ("\n".join(lines) + "\n").encode())
    return resp.agent_id, config
