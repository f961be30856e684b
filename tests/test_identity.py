"""Identity: the hub CA, key files, enrollment tokens, names, and mTLS with a real gRPC server."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelfleet.hub.ca import CertificateAuthority
from modelfleet.kernel import identity
from modelfleet.kernel.errors import InvalidRequestError, Status
from modelfleet.kernel.identity import (
    CredentialsError,
    EnrollToken,
    HubUnreachableError,
    IdentityError,
    TokenError,
    cert_fingerprint,
    fetch_ca_certificate,
    generate_key,
    load_private_key,
    make_csr,
    parse_identity,
    write_pem,
    write_private_key,
)

pytestmark = pytest.mark.timeout(60)

RPC_TIMEOUT_S = 5.0
WHOAMI = "/modelfleet.test.Whoami/Who"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cn_of(cert: x509.Certificate) -> str:
    return identity.certificate_common_name(cert)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


@pytest.fixture
def other_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "other-ca", name="some other CA")


# --------------------------------------------------------------------------------------------
# The CA
# --------------------------------------------------------------------------------------------


def test_ca_is_created_with_ca_extensions_and_reloaded(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    ca = CertificateAuthority.load_or_create(directory, name="test CA")

    assert mode_of(directory / "ca.key") == 0o600
    assert mode_of(directory / "ca.crt") == 0o644
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    assert cert == ca.certificate
    assert cn_of(cert) == "test CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # self-signed
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)

    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)

    assert ca.fingerprint == cert_fingerprint(ca.cert_pem)
    again = CertificateAuthority.load_or_create(directory, name="ignored on reload")
    assert again.fingerprint == ca.fingerprint
    assert again.cert_pem == ca.cert_pem
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "ca.key"]


def test_ca_key_without_cert_is_completed_with_the_same_key(tmp_path: Path) -> None:
    # What a crash between writing ca.key and ca.crt leaves behind.
    directory = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(directory)
    (directory / "ca.crt").unlink()
    second = CertificateAuthority.load_or_create(directory)
    assert second.certificate.public_key() == first.certificate.public_key()


def test_ca_cert_without_key_or_with_a_foreign_key_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority.load_or_create(directory)
    (directory / "ca.key").unlink()
    with pytest.raises(CredentialsError, match="restore the CA key"):
        CertificateAuthority.load_or_create(directory)
    assert not (directory / "ca.key").exists()  # nothing was silently regenerated

    write_private_key(directory / "ca.key", generate_key())
    with pytest.raises(CredentialsError, match="does not belong"):
        CertificateAuthority.load_or_create(directory)


def test_server_cert_has_hub_cn_sans_and_server_auth(ca: CertificateAuthority) -> None:
    key = generate_key()
    pem = ca.issue_server_cert(key.public_key(), ["Hub.Example", "localhost", "127.0.0.1", "::1"])
    cert = x509.load_pem_x509_certificate(pem)

    assert cn_of(cert) == "hub"
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.certificate)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=825) <= lifetime <= dt.timedelta(days=825, minutes=6)

    with pytest.raises(InvalidRequestError):
        ca.issue_server_cert(key.public_key(), [])


def test_csr_with_forged_subject_gets_the_cn_the_hub_chooses(ca: CertificateAuthority) -> None:
    key = generate_key()
    # The node asks to be the hub, and smuggles in a CA:true extension and a SAN.
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("hub.example")]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert = x509.load_pem_x509_certificate(ca.sign_csr(csr, "agent:node-7"))

    assert cn_of(cert) == "agent:node-7"
    assert parse_identity(cn_of(cert)) == ("agent", "node-7")
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.certificate)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # serverAuth for the agent's inference port, under the one name the hub derives from its id.
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-7.agent.modelfleet.internal"]
    assert san.get_values_for_type(x509.IPAddress) == []


def test_sign_csr_accepts_strong_keys_of_each_supported_type(ca: CertificateAuthority) -> None:
    for key in (
        generate_key(),
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ):
        cert = x509.load_pem_x509_certificate(ca.sign_csr(make_csr(key, "x"), "agent:a1"))
        assert cert.public_key() == key.public_key()

    server = ca.sign_csr(make_csr(generate_key(), "x"), "hub", client=False, hostnames=["h.lan"])
    eku = x509.load_pem_x509_certificate(server).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    )
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_sign_csr_refusals(ca: CertificateAuthority) -> None:
    good = make_csr(generate_key(), "aaaaaaaa")

    # Altering the signed content (the subject) breaks the proof of possession.
    der = x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER)
    tampered = x509.load_der_x509_csr(der.replace(b"aaaaaaaa", b"bbbbbbbb")).public_bytes(
        serialization.Encoding.PEM
    )
    with pytest.raises(IdentityError, match="signature"):
        ca.sign_csr(tampered, "agent:a1")

    with pytest.raises(InvalidRequestError, match="not valid PEM"):
        ca.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n", "agent:a1")
    with pytest.raises(IdentityError, match="secp384r1"):
        ca.sign_csr(make_csr(ec.generate_private_key(ec.SECP384R1()), "x"), "agent:a1")
    weak_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(IdentityError, match="1024 bits"):
        ca.sign_csr(make_csr(weak_rsa, "x"), "agent:a1")
    with pytest.raises(IdentityError, match="hub's name"):
        ca.sign_csr(good, "hub")
    with pytest.raises(IdentityError, match="not a modelfleet identity"):
        ca.sign_csr(good, "root")
    with pytest.raises(IdentityError, match="must be named"):
        ca.sign_csr(good, "agent:a1", client=False, hostnames=["h"])
    with pytest.raises(InvalidRequestError, match="positive"):
        ca.sign_csr(good, "agent:a1", days=0)


def test_issue_admin_writes_key_cert_and_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    paths = ca.issue_admin(tmp_path / "admin", name="ops")

    assert mode_of(paths.key) == 0o600
    assert mode_of(paths.cert) == 0o644
    assert paths.ca.read_bytes() == ca.cert_pem
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    assert parse_identity(cn_of(cert)) == ("admin", "ops")
    assert cert.public_key() == load_private_key(paths.key).public_key()
    cert.verify_directly_issued_by(ca.certificate)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


# --------------------------------------------------------------------------------------------
# Key and certificate files
# --------------------------------------------------------------------------------------------


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    original = os.umask(0o022)
    os.umask(original)
    yield lambda value: os.umask(value)
    os.umask(original)


def test_private_key_is_0600_from_the_first_instant_and_leaves_no_temp_files(
    tmp_path: Path, umask: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    umask(0)  # the most permissive umask must not widen the key file
    seen: list[tuple[str, int]] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append((Path(src).name, mode_of(Path(src))))
        real_replace(src, dst)

    monkeypatch.setattr(identity.os, "replace", spy)
    path = tmp_path / "node.key"
    key = generate_key()
    write_private_key(path, key)

    assert len(seen) == 1 and seen[0][1] == 0o600  # the temp file, just before the rename
    assert seen[0][0].startswith(".node.key.") and seen[0][0].endswith(".tmp")
    assert mode_of(path) == 0o600
    assert list(tmp_path.iterdir()) == [path]
    assert load_private_key(path).public_key() == key.public_key()

    # Overwriting replaces the content and keeps the mode.
    second = generate_key()
    write_private_key(path, second)
    assert load_private_key(path).public_key() == second.public_key()
    assert mode_of(path) == 0o600
    assert list(tmp_path.iterdir()) == [path]


def test_failed_write_keeps_the_old_file_and_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.key"
    key = generate_key()
    write_private_key(path, key)

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(identity.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_private_key(path, generate_key())
    assert load_private_key(path).public_key() == key.public_key()
    assert list(tmp_path.iterdir()) == [path]


def test_pem_files_are_0644_even_under_a_strict_umask(
    tmp_path: Path, umask: Callable[[int], None]
) -> None:
    umask(0o077)
    path = tmp_path / "node.crt"
    write_pem(path, b"-----BEGIN CERTIFICATE-----\n")
    assert mode_of(path) == 0o644
    assert path.read_bytes() == b"-----BEGIN CERTIFICATE-----\n"
    assert list(tmp_path.iterdir()) == [path]


def test_load_private_key_names_the_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.key"
    path.write_bytes(b"not a key")
    with pytest.raises(CredentialsError, match=r"garbage\.key") as info:
        load_private_key(path)
    assert info.value.status is Status.FAILED_PRECONDITION


def test_fingerprint_is_sha256_of_der_whatever_the_input_form(ca: CertificateAuthority) -> None:
    der = ca.certificate.public_bytes(serialization.Encoding.DER)
    expected = "sha256:" + hashlib.sha256(der).hexdigest()
    assert cert_fingerprint(der) == expected
    assert cert_fingerprint(ca.cert_pem) == expected
    assert cert_fingerprint(ca.cert_pem.decode()) == expected
    assert cert_fingerprint(ca.certificate) == expected
    colons = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())  # openssl's output
    assert identity.normalize_fingerprint(colons) == expected
    assert identity.normalize_fingerprint(expected.upper()) == expected
    with pytest.raises(InvalidRequestError, match="64 hex digits"):
        identity.normalize_fingerprint("sha256:abc")


# --------------------------------------------------------------------------------------------
# Enrollment tokens
# --------------------------------------------------------------------------------------------


def make_token(fingerprint: str = "sha256:" + "ab" * 32) -> EnrollToken:
    return EnrollToken.create("hub.example:8443", fingerprint, ttl_s=3600, now=1_000_000)


def test_token_round_trip_and_secret_handling() -> None:
    token = make_token()
    text = token.encode()

    assert text.startswith("mft1.")
    assert all(c.isalnum() or c in "-_." for c in text)  # URL- and shell-safe
    assert len(text) < 300
    assert EnrollToken.decode(text) == token
    assert EnrollToken.decode(f"  {text}\n") == token  # pasted with whitespace

    assert token.expires_at == 1_003_600
    assert not token.expired(now=1_003_599) and token.expired(now=1_003_600)
    assert len(base64.urlsafe_b64decode(token.secret + "=" * (-len(token.secret) % 4))) == 32
    assert token.secret not in repr(token)
    assert token.secret_hash == identity.token_secret_hash(token.secret)
    assert token.secret_hash == "sha256:" + hashlib.sha256(token.secret.encode()).hexdigest()
    assert identity.token_secret_matches(token.secret, token.secret_hash)
    assert not identity.token_secret_matches(token.secret + "x", token.secret_hash)
    assert make_token().secret != token.secret


def test_token_with_a_float_expiry_round_trips_in_whole_seconds() -> None:
    token = EnrollToken("id1", "s3cret", "hub:1", "sha256:" + "ab" * 32, 1_000_000.9)
    assert token.expires_at == 1_000_000
    assert EnrollToken.decode(token.encode()) == token


def encode_payload(payload: object) -> str:
    raw = json.dumps(payload).encode()
    return "mft1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def good_payload(**changes: object) -> dict[str, object]:
    token = make_token()
    payload: dict[str, object] = {
        "id": token.token_id,
        "s": token.secret,
        "hub": token.hub_address,
        "ca": token.ca_fingerprint,
        "exp": token.expires_at,
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not ...}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must start with 'mft1.'"),
        ("mft2.eyJ9", "must start with 'mft1.'"),
        ("mft1.***", "not valid base64url-encoded JSON"),
        ("mft1." + base64.urlsafe_b64encode(b"{nope").decode(), "not valid base64url"),
        (encode_payload([1, 2]), "not a JSON object"),
        (encode_payload(good_payload(s=...)), "has no secret"),
        (encode_payload(good_payload(hub=...)), "has no hub_address"),
        (encode_payload(good_payload(ca=...)), "has no ca_fingerprint"),
        (encode_payload(good_payload(exp=...)), "has no expires_at"),
        (encode_payload(good_payload(id=...)), "has no token_id"),
        (encode_payload(good_payload(exp="soon")), "expires_at must be a non-empty int"),
        (encode_payload(good_payload(exp=True)), "expires_at must be a non-empty int"),
        (encode_payload(good_payload(s="")), "secret must be a non-empty str"),
        (encode_payload(good_payload(hub="hub.example")), "is not host:port"),
        (encode_payload(good_payload(hub="hub:99999")), "out of range"),
        (encode_payload(good_payload(ca="md5:00")), "64 hex digits"),
    ],
)
def test_bad_tokens_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(TokenError, match=message) as info:
        EnrollToken.decode(text)
    assert info.value.status is Status.INVALID_ARGUMENT


def test_truncated_token_is_reported_as_bad_encoding() -> None:
    text = make_token().encode()
    with pytest.raises(TokenError, match="truncated or altered"):
        EnrollToken.decode(text[:-7])


def test_split_host_port() -> None:
    assert identity.split_host_port("hub.lan:8443") == ("hub.lan", 8443)
    assert identity.split_host_port("[::1]:8443") == ("::1", 8443)
    with pytest.raises(InvalidRequestError, match=r"\[addr\]:port"):
        identity.split_host_port("::1:8443")


# --------------------------------------------------------------------------------------------
# Identity names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cn", "expected"),
    [
        ("agent:node-1", ("agent", "node-1")),
        ("agent:rpi4.kitchen_2", ("agent", "rpi4.kitchen_2")),
        ("admin:admin", ("admin", "admin")),
        ("hub", ("hub", "hub")),
    ],
)
def test_parse_identity_accepts_the_three_forms(cn: str, expected: tuple[str, str]) -> None:
    assert parse_identity(cn) == expected


@pytest.mark.parametrize(
    "cn",
    [
        "",
        "agent:",
        "agent",
        "admin:",
        "Hub",
        "hub ",
        "agent:a/b",
        "agent:a:b",
        "agent:-x",
        "agent:" + "a" * 129,
        "user:bob",
        "modelfleet hub CA",
        " agent:x",
    ],
)
def test_parse_identity_refuses_everything_else(cn: str) -> None:
    with pytest.raises(IdentityError) as info:
        parse_identity(cn)
    assert info.value.status is Status.PERMISSION_DENIED


def test_identity_constructors_and_auth_context() -> None:
    assert identity.agent_common_name("n1") == "agent:n1"
    assert identity.admin_common_name("ops") == "admin:ops"
    with pytest.raises(IdentityError):
        identity.agent_common_name("a b")
    assert identity.identity_from_auth_context({"x509_common_name": [b"agent:n1"]}) == (
        "agent",
        "n1",
    )
    with pytest.raises(IdentityError, match="no verified client certificate"):
        identity.identity_from_auth_context({"transport_security_type": [b"ssl"]})


# --------------------------------------------------------------------------------------------
# End to end with a real gRPC server
# --------------------------------------------------------------------------------------------


def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Return the CN gRPC verified for the caller, or b"-" when there is none."""
    names = context.auth_context().get("x509_common_name") or [b"-"]
    return names[0]


class Node:
    """A client identity: a key generated locally and a certificate signed from its CSR."""

    def __init__(self, ca: CertificateAuthority, common_name: str) -> None:
        self.key = generate_key()
        self.cert_pem = ca.sign_csr(make_csr(self.key, "chosen-by-node"), common_name)

    def credentials(self, root_pem: bytes) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=root_pem,
            private_key=key_pem(self.key),
            certificate_chain=self.cert_pem,
        )


@pytest.fixture
def hub_tls(ca: CertificateAuthority) -> tuple[bytes, bytes]:
    """The hub's (key PEM, chain PEM): the chain is [leaf, CA], as the hub will serve it."""
    key = generate_key()
    leaf = ca.issue_server_cert(key.public_key(), ["localhost", "127.0.0.1"])
    return key_pem(key), leaf + ca.cert_pem


@pytest.fixture
def start_server() -> Iterator[Callable[..., int]]:
    """Start TLS gRPC servers on loopback (health + whoami); all are stopped at teardown."""
    servers: list[grpc.Server] = []

    def start(key: bytes, chain: bytes, root: bytes, require_client_auth: bool) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        servers.append(server)
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "modelfleet.test.Whoami", {"Who": grpc.unary_unary_rpc_method_handler(whoami)}
                )
            ]
        )
        credentials = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=root, require_client_auth=require_client_auth
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        assert port > 0
        server.start()
        return port

    yield start
    for server in servers:
        server.stop(0)


def health_check(port: int, credentials: grpc.ChannelCredentials) -> int:
    # Dial the IP: the server certificate carries 127.0.0.1 as an iPAddress SAN.
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        return stub.Check(request, timeout=RPC_TIMEOUT_S).status


def call_whoami(port: int, credentials: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        return channel.unary_unary(WHOAMI)(b"", timeout=RPC_TIMEOUT_S)


def test_fetch_ca_certificate_from_an_mtls_grpc_server(
    ca: CertificateAuthority, hub_tls: tuple[bytes, bytes], start_server: Callable[..., int]
) -> None:
    port = start_server(*hub_tls, ca.cert_pem, require_client_auth=True)

    # (a) The chain is readable although the server requires a client certificate we do not
    # have: under TLS 1.3 the client's handshake completes before the server checks it.
    assert fetch_ca_certificate("127.0.0.1", port, ca.fingerprint, timeout=5) == ca.cert_pem

    wrong = "sha256:" + "0" * 64
    with pytest.raises(IdentityError, match="no CA certificate with fingerprint") as info:
        fetch_ca_certificate("127.0.0.1", port, wrong, timeout=5)
    assert f"127.0.0.1:{port}" in str(info.value) and wrong in str(info.value)

    # Pinning the leaf instead of the CA is refused: the leaf is not self-issued.
    leaf_fingerprint = cert_fingerprint(hub_tls[1])
    with pytest.raises(IdentityError, match="not issued by CA"):
        fetch_ca_certificate("127.0.0.1", port, leaf_fingerprint, timeout=5)


def test_fetch_ca_certificate_refuses_a_server_that_only_copies_the_ca_cert(
    ca: CertificateAuthority, other_ca: CertificateAuthority, start_server: Callable[..., int]
) -> None:
    # An impostor serves [its own leaf, our public CA cert]: the fingerprint matches, the
    # leaf's signature does not.
    key = generate_key()
    leaf = other_ca.issue_server_cert(key.public_key(), ["127.0.0.1"])
    port = start_server(key_pem(key), leaf + ca.cert_pem, other_ca.cert_pem, False)
    with pytest.raises(IdentityError, match="not issued by CA"):
        fetch_ca_certificate("127.0.0.1", port, ca.fingerprint, timeout=5)


def test_fetch_ca_certificate_reports_unreachable_hubs_within_the_timeout() -> None:
    with socket.socket() as bound:  # bound but not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(HubUnreachableError, match=f"127.0.0.1:{port}") as info:
            fetch_ca_certificate("127.0.0.1", port, "sha256:" + "0" * 64, timeout=2)
        assert info.value.status is Status.UNAVAILABLE

    with socket.socket() as silent:  # accepts TCP (backlog) but never speaks TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        with pytest.raises(HubUnreachableError, match="timed out"):
            fetch_ca_certificate("127.0.0.1", port, "sha256:" + "0" * 64, timeout=0.5)


def test_mtls_admits_only_clients_with_a_certificate_from_the_ca(
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    hub_tls: tuple[bytes, bytes],
    start_server: Callable[..., int],
) -> None:
    port = start_server(*hub_tls, ca.cert_pem, require_client_auth=True)
    # The agent's view: its only trust anchor is what fetch_ca_certificate returned.
    root = fetch_ca_certificate("127.0.0.1", port, ca.fingerprint, timeout=5)
    agent = Node(ca, "agent:node-1")

    # (b) A certificate signed by the CA from the node's own CSR completes a call.
    assert health_check(port, agent.credentials(root)) == health_pb2.HealthCheckResponse.SERVING

    # (d) The servicer sees the CN the hub assigned, not the one in the CSR.
    assert call_whoami(port, agent.credentials(root)) == b"agent:node-1"
    admin = Node(ca, "admin:ops")
    assert call_whoami(port, admin.credentials(root)) == b"admin:ops"

    # (c) No client certificate, or one from another CA: the handshake is refused.
    impostor = Node(other_ca, "agent:node-1")
    for credentials in (
        grpc.ssl_channel_credentials(root_certificates=root),
        impostor.credentials(root),
    ):
        with pytest.raises(grpc.RpcError) as info:
            health_check(port, credentials)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def test_server_auth_only_port_does_not_request_client_certificates(
    ca: CertificateAuthority, hub_tls: tuple[bytes, bytes], start_server: Callable[..., int]
) -> None:
    """(e) FINDING (grpcio 1.85.1): with ``require_client_auth=False`` gRPC Python does not
    request a client certificate at all, even when ``root_certificates`` is given (it maps to
    GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE, not "request but don't require"). A client that
    has a certificate is served, but ``auth_context()`` has no ``x509_common_name``: the peer
    is anonymous. So one port cannot serve both anonymous enrollment and authenticated agents;
    the hub uses a separate server-auth-only port for enrollment, where the token secret is the
    credential. If this test starts failing after a grpc upgrade, revisit that design.
    """
    port = start_server(*hub_tls, ca.cert_pem, require_client_auth=False)
    agent = Node(ca, "agent:node-1")

    assert call_whoami(port, agent.credentials(ca.cert_pem)) == b"-"
    assert call_whoami(port, grpc.ssl_channel_credentials(ca.cert_pem)) == b"-"
    assert (
        health_check(port, grpc.ssl_channel_credentials(ca.cert_pem))
        == health_pb2.HealthCheckResponse.SERVING
    )
    # Enrollment's trust bootstrap works on such a port with any TLS version.
    assert fetch_ca_certificate("127.0.0.1", port, ca.fingerprint, timeout=5) == ca.cert_pem
