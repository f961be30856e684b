"""The hub's certificate authority: one self-signed ECDSA P-256 CA kept in a directory.

It issues the hub's own server certificate and signs the CSRs agents send when they enroll.
The CA, not the node, decides the certificate's name: :meth:`CertificateAuthority.sign_csr`
ignores the subject in the CSR, so a node cannot pick its identity (``agent:<id>`` is assigned by
the hub from the enrollment token). Everything trusted later (mTLS on the hub port, MQTT TLS)
hangs off ``ca.crt``; its fingerprint is what enrollment tokens pin.

Files: ``ca.key`` (mode 0600) and ``ca.crt`` (0644). No CRL is published: revocation is the hub's
registry refusing a known-revoked identity; certificates are short-lived enough to expire anyway.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.kernel.identity import (
    HUB_CN,
    CredentialsError,
    IdentityError,
    admin_common_name,
    agent_server_name,
    cert_fingerprint,
    certificate_common_name,
    generate_key,
    load_certificate,
    load_private_key,
    parse_identity,
    write_pem,
    write_private_key,
)

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
CA_VALIDITY = _dt.timedelta(days=3650)
# Certificates start this far in the past: small devices often boot with a clock that lags
# (no RTC battery, NTP not yet synced) and would otherwise reject a certificate as not yet valid.
CLOCK_SKEW = _dt.timedelta(minutes=5)
# 825 days is the longest validity Apple platforms accept for TLS server certificates.
DEFAULT_SERVER_DAYS = 825
DEFAULT_CLIENT_DAYS = 365
MIN_RSA_BITS = 2048


class AdminPaths(NamedTuple):
    """Where :meth:`CertificateAuthority.issue_admin` wrote the admin's credentials."""

    key: Path
    cert: Path
    ca: Path


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _check_key_type(key: PublicKeyTypes) -> None:
    """Accept only key types every TLS stack we use handles and that are strong enough."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise IdentityError(
                f"EC key on curve {key.curve.name} is not accepted; use P-256 (secp256r1)"
            )
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise IdentityError(
                f"RSA key of {key.key_size} bits is not accepted; use at least {MIN_RSA_BITS}"
            )
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise IdentityError(
            f"{type(key).__name__} keys are not accepted; use ECDSA P-256, Ed25519 or RSA >= 2048"
        )


def _key_usage(key: PublicKeyTypes) -> x509.KeyUsage:
    # RSA key exchange (TLS 1.2 without ECDHE) needs keyEncipherment; EC and Ed25519 keys only sign.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _subject_alt_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        host = host.strip()
        if not host:
            raise InvalidRequestError("empty hostname in the server certificate's name list")
        try:
            # An IP must be an iPAddress SAN: TLS clients never match an IP against a DNS SAN.
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host.lower()))
    return names


class CertificateAuthority:
    """A CA whose key and certificate live in ``directory``; see :meth:`load_or_create`."""

    def __init__(
        self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
    ) -> None:
        self.directory = directory
        self._key = key
        self.certificate = cert

    @classmethod
    def load_or_create(
        cls, directory: str | os.PathLike[str], name: str = "modelfleet hub CA"
    ) -> CertificateAuthority:
        """Load the CA from ``directory``, creating a new one there if it has none yet.

        The key is written before the certificate. If a crash left only ``ca.key``, the
        certificate is made from that key on the next start: nothing can have been issued without
        ``ca.crt``. A ``ca.crt`` without its key, or a key that does not match the certificate,
        is an error rather than a new CA, because a new CA silently orphans every enrolled agent.
        """
        path = Path(directory)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path, cert_path = path / CA_KEY_FILE, path / CA_CERT_FILE

        if cert_path.exists() and not key_path.exists():
            raise CredentialsError(
                f"{cert_path} exists but {key_path} does not: restore the CA key from backup; "
                "creating a new CA would invalidate every enrolled agent"
            )
        if key_path.exists():
            key = load_private_key(key_path)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CredentialsError(f"{key_path} is not an EC private key")
        else:
            key = generate_key()
            write_private_key(key_path, key)

        if cert_path.exists():
            cert = load_certificate(cert_path.read_bytes())
            if cert.public_key() != key.public_key():
                raise CredentialsError(f"{cert_path} does not belong to the key in {key_path}")
        else:
            cert = cls._self_signed(key, name)
            write_pem(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(path, key, cert)

    @staticmethod
    def _self_signed(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        public = key.public_key()
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            # pathlen 0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the CA certificate: the value enrollment tokens pin."""
        return cert_fingerprint(self.certificate)

    def _issue(
        self,
        public_key: PublicKeyTypes,
        common_name: str,
        days: float,
        usage: x509.ObjectIdentifier | Sequence[x509.ObjectIdentifier],
        hostnames: Sequence[str] = (),
    ) -> bytes:
        _check_key_type(public_key)
        # Narrowed by the check above (EC P-256, RSA >= 2048 or Ed25519), which mypy cannot see.
        cert_key = cast(CertificatePublicKeyTypes, public_key)
        if days <= 0:
            raise InvalidRequestError(f"certificate validity must be positive, got {days} days")
        now = _now()
        # A certificate never outlives the CA that vouches for it.
        not_after = min(now + _dt.timedelta(days=days), self.certificate.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(cert_key)  # type narrowed by _check_key_type
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(public_key), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [usage] if isinstance(usage, x509.ObjectIdentifier) else list(usage)
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(cert_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if hostnames:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(_subject_alt_names(hostnames)), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue_server_cert(
        self,
        key_public: PublicKeyTypes,
        hostnames: Sequence[str],
        days: int = DEFAULT_SERVER_DAYS,
    ) -> bytes:
        """The hub's TLS server certificate (PEM): CN ``hub``, serverAuth, one SAN per name.

        ``hostnames`` must list every name and IP agents dial: clients verify the SANs, not the
        CN. IP addresses become iPAddress SANs.
        """
        if not hostnames:
            raise InvalidRequestError("a server certificate needs at least one hostname or IP")
        return self._issue(
            key_public, HUB_CN, days, ExtendedKeyUsageOID.SERVER_AUTH, hostnames=hostnames
        )

    def issue_for_key(
        self,
        key_public: PublicKeyTypes,
        common_name: str,
        *,
        server: bool,
        hostnames: Sequence[str] = (),
        days: int = DEFAULT_SERVER_DAYS,
    ) -> bytes:
        """A certificate for a key held by the hub itself (the MQTT broker's server certificate,
        the hub's own MQTT client identity): serverAuth or clientAuth."""
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        return self._issue(key_public, common_name, days, usage, hostnames=hostnames)

    def sign_csr(
        self,
        csr_pem: bytes,
        common_name: str,
        days: float = DEFAULT_CLIENT_DAYS,
        client: bool = True,
        *,
        hostnames: Sequence[str] = (),
    ) -> bytes:
        """Sign a CSR (PEM) as ``common_name`` and return the certificate (PEM).

        The CSR's subject and extensions are ignored: only its public key is used, after checking
        the CSR's self-signature (proof the requester holds the private key). ``client=True``
        issues a clientAuth certificate for an ``agent:``/``admin:`` CN; ``client=False`` a
        serverAuth certificate for CN ``hub`` with ``hostnames`` as SANs.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise InvalidRequestError(
                f"certificate signing request is not valid PEM: {exc}"
            ) from exc
        if not csr.is_signature_valid:
            raise IdentityError("certificate signing request signature does not verify")
        kind, name = parse_identity(common_name)
        usage: x509.ObjectIdentifier | list[x509.ObjectIdentifier]
        if client:
            if kind == "hub":
                raise IdentityError("a client certificate cannot carry the hub's name")
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
            if kind == "agent":
                # An agent may serve its inference port with this certificate
                # (tls_agent_identity): serverAuth, for one name only the hub assigns, so no
                # agent can pass for another, for the hub or for the broker.
                usage = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
                hostnames = [agent_server_name(name)]
        else:
            if kind != "hub":
                raise IdentityError(f"a server certificate must be named {HUB_CN!r}")
            if not hostnames:
                raise InvalidRequestError("a server certificate needs at least one hostname or IP")
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        return self._issue(csr.public_key(), common_name, days, usage, hostnames=hostnames)

    def issue_crl(self, revoked: Iterable[tuple[int, float]], lifetime_s: float) -> bytes:
        """A CRL (PEM) listing ``revoked`` (serial, revoked at, Unix time), valid ``lifetime_s``.

        OpenSSL refuses every client certificate once the CRL's nextUpdate has passed, so the
        hub issues a new one well before (HubCore.refresh_crl).
        """
        if lifetime_s <= 0:
            raise InvalidRequestError(f"CRL lifetime must be positive, got {lifetime_s} s")
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + _dt.timedelta(seconds=lifetime_s))
            # Increasing across hub restarts without any state: the issue time in ms.
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        for serial, at in revoked:
            when = _dt.datetime.fromtimestamp(at or now.timestamp(), _dt.UTC)
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM)

    def issue_admin(
        self,
        directory: str | os.PathLike[str],
        name: str = "admin",
        days: float = DEFAULT_CLIENT_DAYS,
    ) -> AdminPaths:
        """Create admin credentials for the hub CLI in ``directory``.

        The key is generated here because the admin runs on the hub machine; ``ca.crt`` is copied
        alongside so the CLI has everything it needs to dial the hub with mTLS.
        """
        path = Path(directory)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths = AdminPaths(path / "admin.key", path / "admin.crt", path / CA_CERT_FILE)
        key = generate_key()
        cert_pem = self._issue(
            key.public_key(),
            admin_common_name(name),
            days,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        write_private_key(paths.key, key)
        write_pem(paths.cert, cert_pem)
        write_pem(paths.ca, self.cert_pem)
        return paths

    def renew_admin(self, directory: str | os.PathLike[str], days: float) -> bytes:
        """A new admin certificate for the key already in ``directory`` (same name), written
        atomically over the old one: CLI calls in progress keep the file they read."""
        path = Path(directory)
        old = load_certificate((path / "admin.crt").read_bytes())
        key = load_private_key(path / "admin.key")
        cert_pem = self._issue(
            key.public_key(),
            certificate_common_name(old),
            days,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        write_pem(path / "admin.crt", cert_pem)
        return cert_pem
