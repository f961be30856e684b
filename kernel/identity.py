"""Node identity: keys, CSRs, certificate names, enrollment tokens and CA trust bootstrap.

Shared by hub and agent, so it depends only on ``cryptography`` and the standard library (never
on grpc, ``agent`` or ``hub``). The flow it supports:

1. An operator creates an :class:`EnrollToken` on the hub and hands ``token.encode()`` to a node.
   The hub stores only :func:`token_secret_hash` of the secret.
2. The agent learns the hub CA with :func:`fetch_ca_certificate`, trusting it only if its SHA-256
   matches the fingerprint carried in the token (kubeadm's CA-hash discovery).
3. The agent generates its key on the node (:func:`generate_key`, :func:`write_private_key`),
   sends :func:`make_csr` plus the token secret over a channel that verifies the hub against that
   CA, and receives a certificate whose CN the hub chose (``agent:<id>``).
4. All later traffic is mTLS; each side names the peer with :func:`parse_identity`.
"""

from __future__ import annotations

import _ssl
import base64
import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import secrets
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import NameOID

from modelfleet.kernel.atomic import atomic_write as _atomic_write
from modelfleet.kernel.errors import InvalidRequestError, ModelfleetError, Status


class IdentityError(ModelfleetError):
    """A peer, certificate or CSR is not one we trust or accept."""

    status = Status.PERMISSION_DENIED
    reason = "identity"


class TokenError(InvalidRequestError):
    """An enrollment token is malformed. The message says which part is wrong."""

    reason = "token"


class CredentialsError(ModelfleetError):
    """A key or certificate file on this machine is missing pieces or cannot be parsed."""

    status = Status.FAILED_PRECONDITION
    reason = "credentials"


class HubUnreachableError(ModelfleetError):
    """The hub could not be reached or did not complete a TLS handshake."""

    status = Status.UNAVAILABLE
    reason = "hub_unreachable"


# ---------------------------------------------------------------------------------------------
# Identity names
# ---------------------------------------------------------------------------------------------

IdentityKind = Literal["agent", "admin", "hub"]

HUB_CN = "hub"
AGENT_PREFIX = "agent:"
ADMIN_PREFIX = "admin:"
# Names end up in certificate subjects, log lines, metric labels and MQTT topic segments, so they
# are kept to the same boring alphabet as model names (no '/', '+', '#', whitespace or ':').
IDENTITY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
# gRPC's auth context key for the verified peer certificate's subject CN.
AUTH_CONTEXT_CN_KEY = "x509_common_name"


def _check_name(kind: str, name: str) -> str:
    if not IDENTITY_NAME_RE.match(name):
        raise IdentityError(
            f"invalid {kind} name {name!r}: use 1-128 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter or digit"
        )
    return name


def agent_common_name(agent_id: str) -> str:
    """The certificate CN of agent ``agent_id``: ``agent:<agent_id>``."""
    return AGENT_PREFIX + _check_name("agent", agent_id)


# The DNS name an agent's certificate carries for its inference port: derived from the id the
# hub assigned, under a reserved private suffix (.internal), so it never names a real host.
AGENT_SERVER_SUFFIX = ".agent.modelfleet.internal"


def agent_server_name(agent_id: str) -> str:
    """The TLS server name of agent ``agent_id``: ``<agent_id>.agent.modelfleet.internal``.

    Inference clients that trust the hub's CA verify an agent by this name (gRPC channel option
    ``grpc.ssl_target_name_override``), since the hub cannot vouch for the addresses agents use.
    """
    return _check_name("agent", agent_id).lower() + AGENT_SERVER_SUFFIX


def admin_common_name(name: str) -> str:
    """The certificate CN of admin ``name``: ``admin:<name>``."""
    return ADMIN_PREFIX + _check_name("admin", name)


def parse_identity(common_name: str) -> tuple[IdentityKind, str]:
    """Split a certificate CN into ``(kind, name)``; the hub is ``("hub", "hub")``.

    Anything that is not exactly one of the three forms raises :class:`IdentityError`, so a
    certificate the CA signed for some other purpose never maps to an identity by accident.
    """
    if common_name == HUB_CN:
        return "hub", HUB_CN
    if common_name.startswith(AGENT_PREFIX):
        return "agent", _check_name("agent", common_name[len(AGENT_PREFIX) :])
    if common_name.startswith(ADMIN_PREFIX):
        return "admin", _check_name("admin", common_name[len(ADMIN_PREFIX) :])
    raise IdentityError(
        f"certificate common name {common_name!r} is not a modelfleet identity "
        "(expected 'agent:<id>', 'admin:<name>' or 'hub')"
    )


def identity_from_auth_context(
    auth_context: Mapping[str, Sequence[bytes]],
) -> tuple[IdentityKind, str]:
    """The peer identity from a gRPC ``context.auth_context()`` (a plain dict, so no grpc import).

    gRPC fills ``x509_common_name`` only from a client certificate it verified against the
    server's root certificates; a peer without one is refused here.
    """
    values = auth_context.get(AUTH_CONTEXT_CN_KEY) or []
    if len(values) != 1:
        raise IdentityError("peer presented no verified client certificate")
    return parse_identity(values[0].decode("utf-8", errors="replace"))


# ---------------------------------------------------------------------------------------------
# Keys, CSRs and certificates
# ---------------------------------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 key.

    P-256 is the one curve supported everywhere we terminate TLS: gRPC's BoringSSL, OpenSSL
    (Mosquitto for MQTT) and hardware keystores on small devices. Ed25519 certificates are not
    accepted by every TLS stack yet.
    """
    return ec.generate_private_key(ec.SECP256R1())


def write_private_key(path: str | os.PathLike[str], key: PrivateKeyTypes) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, atomically, mode 0600.

    Unencrypted because agents start unattended; the file mode is the protection, as for SSH host
    keys.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _atomic_write(path, pem, 0o600)


def write_pem(path: str | os.PathLike[str], data: bytes) -> None:
    """Write public PEM data (certificates, chains), atomically, mode 0644."""
    _atomic_write(path, data, 0o644)


def load_private_key(path: str | os.PathLike[str]) -> PrivateKeyTypes:
    """Read an unencrypted PEM private key written by :func:`write_private_key`."""
    data = Path(path).read_bytes()
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(f"cannot read private key {path}: {exc}") from exc


def load_certificate(data: bytes | str) -> x509.Certificate:
    """Parse one certificate given as PEM or DER (the first one if PEM holds several)."""
    raw = data.encode("ascii") if isinstance(data, str) else bytes(data)
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise CredentialsError(f"not a valid X.509 certificate: {exc}") from exc


# Renew this long before a certificate expires (certbot's 30 days for its 90-day certificates;
# a year-long certificate gets the same month to find its hub reachable).
RENEW_BEFORE_S = 30 * 86400


def renewal_time(cert: x509.Certificate, before_s: float = RENEW_BEFORE_S) -> float:
    """When (epoch seconds) ``cert`` should be renewed: ``before_s`` ahead of its expiry, or at
    half its lifetime if that is sooner, so a short-lived certificate is not renewed at once."""
    not_before = cert.not_valid_before_utc.timestamp()
    not_after = cert.not_valid_after_utc.timestamp()
    return not_after - min(before_s, (not_after - not_before) / 2)


def certificate_common_name(cert: x509.Certificate) -> str:
    """The subject CN of ``cert``; certificates without exactly one CN are refused."""
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attributes) != 1:
        raise IdentityError(f"certificate subject {cert.subject.rfc4514_string()!r} has no CN")
    value = attributes[0].value
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def make_csr(key: CertificateIssuerPrivateKeyTypes, common_name: str) -> bytes:
    """A PEM certificate signing request for ``key``.

    The hub ignores the requested subject and assigns the CN itself; the CSR's purpose is to prove
    possession of the key (it is signed with it), so the private key never leaves the node.
    """
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    # Ed25519 signs the message itself and takes no separate hash algorithm.
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")


def cert_fingerprint(cert: bytes | str | x509.Certificate) -> str:
    """``"sha256:<hex>"`` of the certificate's DER encoding (PEM or DER accepted).

    Same value as ``openssl x509 -noout -fingerprint -sha256`` without the colons, lower case.
    """
    if not isinstance(cert, x509.Certificate):
        cert = load_certificate(cert)
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def normalize_fingerprint(fingerprint: str) -> str:
    """Canonical ``sha256:<hex>``; accepts any case, a missing prefix, and ``AB:CD:..`` pairs.

    The variants are what operators paste from ``openssl x509 -noout -fingerprint -sha256``.
    """
    text = fingerprint.strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:") :]
    candidate = "sha256:" + text.replace(":", "")
    if not FINGERPRINT_RE.match(candidate):
        raise InvalidRequestError(
            f"CA fingerprint {fingerprint!r} is not 'sha256:' followed by 64 hex digits"
        )
    return candidate


# ---------------------------------------------------------------------------------------------
# Enrollment tokens
# ---------------------------------------------------------------------------------------------

TOKEN_PREFIX = "mft1."
# JSON keys are short because the encoded token is pasted into shells and cloud-init files.
_TOKEN_FIELDS: dict[str, tuple[str, type]] = {
    "token_id": ("id", str),
    "secret": ("s", str),
    "hub_address": ("hub", str),
    "ca_fingerprint": ("ca", str),
    "expires_at": ("exp", int),
}


def token_secret_hash(secret: str) -> str:
    """What the hub stores instead of a token secret: ``"sha256:<hex>"`` of its UTF-8 bytes.

    A plain hash is enough (no salt or KDF) because the secret is 256 random bits, not a password.
    """
    return "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()


def token_secret_matches(secret: str, stored_hash: str) -> bool:
    """Compare a presented secret with a stored :func:`token_secret_hash` in constant time."""
    return hmac.compare_digest(token_secret_hash(secret), stored_hash)


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``; the port is required (there is no default)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise InvalidRequestError(f"address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidRequestError(f"address {address!r}: write IPv6 hosts as [addr]:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise InvalidRequestError(f"address {address!r}: port {port} is out of range")
    return host, port


@dataclasses.dataclass(frozen=True)
class EnrollToken:
    """A one-time enrollment token: what a node needs to find, trust and join the hub.

    ``hub_address`` is the ``host:port`` of the enrollment endpoint, ``ca_fingerprint`` pins the
    hub CA (:func:`cert_fingerprint`), ``expires_at`` is Unix time in whole seconds.
    """

    token_id: str
    secret: str
    hub_address: str
    ca_fingerprint: str
    expires_at: int

    def __post_init__(self) -> None:
        # Callers often compute expiry as time.time() + ttl (a float); the wire format is whole
        # seconds, so normalise here and a token always equals its own decode(encode()).
        if isinstance(self.expires_at, float):
            object.__setattr__(self, "expires_at", math.floor(self.expires_at))

    @classmethod
    def create(
        cls, hub_address: str, ca_fingerprint: str, ttl_s: float, *, now: float | None = None
    ) -> EnrollToken:
        """A fresh token with a random id and a 32-byte random secret."""
        split_host_port(hub_address)
        now = time.time() if now is None else now
        return cls(
            token_id=secrets.token_hex(8),
            secret=secrets.token_urlsafe(32),
            hub_address=hub_address,
            ca_fingerprint=normalize_fingerprint(ca_fingerprint),
            expires_at=int(now + ttl_s),
        )

    @property
    def secret_hash(self) -> str:
        return token_secret_hash(self.secret)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def encode(self) -> str:
        """``mft1.`` + unpadded base64url of compact JSON: safe in URLs, shells and YAML."""
        payload = {short: getattr(self, name) for name, (short, _) in _TOKEN_FIELDS.items()}
        raw = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, text: str) -> EnrollToken:
        """Parse :meth:`encode` output; every failure says which part of the token is wrong."""
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            shown = text[:8] + ("..." if len(text) > 8 else "")
            raise TokenError(
                f"enrollment token must start with {TOKEN_PREFIX!r} (got {shown!r}); "
                "was it copied completely?"
            )
        body = text[len(TOKEN_PREFIX) :]
        try:
            raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
            payload: Any = json.loads(raw.decode("utf-8"))
        except (binascii.Error, ValueError) as exc:
            raise TokenError(
                f"enrollment token is not valid base64url-encoded JSON after {TOKEN_PREFIX!r} "
                f"(truncated or altered?): {exc}"
            ) from exc
        if not isinstance(payload, dict):
            raise TokenError("enrollment token payload is not a JSON object")
        values: dict[str, Any] = {}
        for name, (short, kind) in _TOKEN_FIELDS.items():
            if short not in payload:
                raise TokenError(f"enrollment token has no {name} (key {short!r})")
            value = payload[short]
            # bool is an int subclass; a token with "exp": true is malformed, not "expires at 1".
            if not isinstance(value, kind) or isinstance(value, bool) or value in ("", None):
                raise TokenError(
                    f"enrollment token field {name} must be a non-empty {kind.__name__}, "
                    f"got {value!r}"
                )
            values[name] = value
        try:
            split_host_port(values["hub_address"])
            values["ca_fingerprint"] = normalize_fingerprint(values["ca_fingerprint"])
        except InvalidRequestError as exc:
            raise TokenError(f"enrollment token: {exc}") from exc
        return cls(**values)

    def __repr__(self) -> str:
        # Keep the secret out of logs and tracebacks.
        return (
            f"EnrollToken(token_id={self.token_id!r}, secret='***', "
            f"hub_address={self.hub_address!r}, ca_fingerprint={self.ca_fingerprint!r}, "
            f"expires_at={self.expires_at})"
        )


# ---------------------------------------------------------------------------------------------
# CA trust bootstrap
# ---------------------------------------------------------------------------------------------


def _unverified_chain_der(sock: ssl.SSLSocket) -> list[bytes]:
    """The certificate chain the peer sent, leaf first, as DER, without any verification."""
    public = getattr(sock, "get_unverified_chain", None)
    if public is not None:  # Python >= 3.13: list of DER bytes
        return list(public() or [])
    # Python 3.11/3.12 have no public API for the unverified chain, but the C object behind the
    # socket has had get_unverified_chain() since 3.10; it returns _ssl.Certificate objects.
    chain = sock._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    return [item.public_bytes(_ssl.ENCODING_DER) for item in chain or []]


def fetch_ca_certificate(
    host: str, port: int, expected_fingerprint: str, timeout: float = 10.0
) -> bytes:
    """Fetch the hub CA certificate (PEM), trusting it only if its fingerprint matches.

    The agent has no trust anchor yet, so the handshake deliberately does not verify the server.
    Trust comes from the fingerprint delivered out of band in the enrollment token: the chain
    element whose SHA-256 matches is the CA. The leaf must be a ``hub`` certificate issued by that
    CA, so a server that merely copies the public CA certificate into its chain is refused.

    Works against a gRPC server: ALPN offers ``h2`` (gRPC refuses TLS connections that do not
    negotiate it). On a port that requires client certificates the chain is still readable with
    TLS 1.3, where the client finishes its handshake before the server checks the (absent) client
    certificate; with TLS 1.2 such a server aborts the handshake, so serve enrollment on a
    server-auth-only port if clients may be limited to TLS 1.2.
    """
    expected = normalize_fingerprint(expected_fingerprint)
    where = f"{host}:{port}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # see docstring: trust comes from the fingerprint
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    # Not an IP literal: send SNI, so a hub behind an SNI router still answers. Python never sends
    # SNI for IP literals, so passing those is harmless too.
    try:
        ipaddress.ip_address(host)
        server_hostname = None
    except ValueError:
        server_hostname = host
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            chain = _unverified_chain_der(tls)
    except OSError as exc:  # includes ssl.SSLError, socket.timeout and refused connections
        raise HubUnreachableError(f"cannot fetch the CA from hub at {where}: {exc}") from exc
    if not chain:
        raise IdentityError(f"hub at {where} presented no certificates; refusing to enroll")

    certs = [x509.load_der_x509_certificate(der) for der in chain]
    matches = [cert for cert in certs if cert_fingerprint(cert) == expected]
    if not matches:
        raise IdentityError(
            f"hub at {where} presented no CA certificate with fingerprint {expected}; "
            "refusing to enroll (wrong hub address, a re-created hub CA, or interception)"
        )
    ca_cert, leaf = matches[0], certs[0]
    try:
        # Checks the issuer name and the signature for any key type (ECDSA, RSA, Ed25519).
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise IdentityError(
            f"hub at {where} presented a server certificate not issued by CA {expected}; "
            "refusing to enroll"
        ) from exc
    if certificate_common_name(leaf) != HUB_CN:
        raise IdentityError(
            f"hub at {where} presented a certificate for {certificate_common_name(leaf)!r}, "
            f"not {HUB_CN!r}; refusing to enroll"
        )
    return ca_cert.public_bytes(serialization.Encoding.PEM)
