"""Who may talk to the inference port: TLS, mutual TLS and a bearer token (all optional).

Certificates are re-read when their files change (checked at each new connection), so a renewed
agent identity or a rotated operator certificate takes effect without a restart; a changed pair
that does not match (half-way through a rotation) is not used until it does. The bearer token is
re-read on SIGHUP. Nothing here ever logs a token or key material.

grpc.health.v1 stays reachable without a token: probes (Kubernetes, load balancers) call it
without credentials, and it tells nothing about models beyond their names being served.
"""

from __future__ import annotations

import hmac
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.kernel.identity import CredentialsError

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Long enough that guessing is hopeless at any request rate (openssl rand -hex 32 gives 64).
MIN_TOKEN_CHARS = 16
MAX_TOKEN_BYTES = 4096
# Refusals are logged at most this often (an open port can be hammered; the log must survive it).
REFUSAL_LOG_INTERVAL_S = 10.0


def warn_if_exposed(path: Path, what: str) -> None:
    """A secret file readable by group or others is warned about, not refused (as for signing
    keys): refusing would turn a permissions slip into an outage."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "%s %s is readable by group/others (mode %o): chmod 600 it", what, path, mode & 0o777
        )


@dataclass(frozen=True)
class TlsFiles:
    """Where the inference port's TLS material lives; ``client_ca`` set means mutual TLS."""

    cert: Path
    key: Path
    client_ca: Path | None
    # Setting names for error messages, so the operator knows which key to fix.
    cert_setting: str = "tls_cert"
    key_setting: str = "tls_key"
    ca_setting: str = "tls_client_ca"
    # What to do about a certificate without serverAuth.
    server_auth_fix: str = "issue one with serverAuth"

    def paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def load_tls(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """Read and check the files; every problem names the file and the setting."""
    chain_pem = _read(files.cert, files.cert_setting)
    key_pem = _read(files.key, files.key_setting)
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise CredentialsError(
            f"{files.cert_setting}: {files.cert} is not a PEM certificate chain: {exc}"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(
            f"{files.key_setting}: {files.key} is not an unencrypted PEM private key: {exc}"
        ) from None
    leaf = chain[0]
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise CredentialsError(
            f"{files.key_setting}: the key in {files.key} does not match the certificate in "
            f"{files.cert} ({files.cert_setting}); name the key that belongs to it"
        )
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        raise CredentialsError(
            f"{files.cert_setting}: the certificate in {files.cert} is not for TLS servers (its "
            f"extended key usage lacks serverAuth), so clients would refuse it; "
            f"{files.server_auth_fix}"
        )
    if leaf.not_valid_after_utc.timestamp() <= time.time():
        log.warning(
            "inference TLS certificate %s expired at %s: clients will refuse it",
            files.cert,
            leaf.not_valid_after_utc,
        )
    ca_pem = None
    if files.client_ca is not None:
        ca_pem = _read(files.client_ca, files.ca_setting)
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as exc:
            raise CredentialsError(
                f"{files.ca_setting}: {files.client_ca} is not a PEM bundle of CA "
                f"certificates: {exc}"
            ) from None
    return grpc.ssl_server_certificate_configuration([(key_pem, chain_pem)], ca_pem)


class _ReloadingTls:
    """gRPC's certificate fetcher: called at every new connection, on gRPC's threads."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._seen = self._stamp()

    def _stamp(self) -> tuple:
        stamp: list[tuple[int, int, int] | None] = []
        for path in self.files.paths():
            try:
                st = path.stat()
                stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            stamp = self._stamp()
            if stamp == self._seen:
                return None  # unchanged: gRPC keeps what it has
            # Remember the stamp even if loading fails, so a broken file is reported once, not
            # at every connection; the next change is tried again.
            self._seen = stamp
            try:
                config = load_tls(self.files)
            except CredentialsError as exc:
                log.warning("inference TLS: keeping the certificate in use: %s", exc)
                return None
            log.info("inference TLS: certificate reloaded from %s", self.files.cert)
            return config


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS credentials that follow changes to ``files``; raises if they are unusable now."""
    warn_if_exposed(files.key, "inference TLS key")
    # The fetcher notes the files' state before they are read: a change in between is not missed.
    fetcher = _ReloadingTls(files)
    initial = load_tls(files)
    return grpc.dynamic_ssl_server_credentials(
        initial, fetcher, require_client_authentication=files.client_ca is not None
    )


def _ssl_context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert, files.key)
    if files.client_ca is not None:
        ctx.load_verify_locations(cafile=files.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """The same TLS for the HTTP port (ssl module) as :func:`server_credentials` gives gRPC:
    the same checks, mutual TLS when ``files.client_ca`` is set, and the files' changes
    followed at each new connection (a changed, matching set is used from then on)."""
    fetcher = _ReloadingTls(files)
    load_tls(files)
    base = _ssl_context(files)
    current = [base]

    def pick(conn: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # Called for every handshake (with or without SNI), on the event loop.
        if fetcher() is not None:
            try:
                current[0] = _ssl_context(files)
            except (OSError, ssl.SSLError) as exc:
                log.warning("inference TLS (HTTP): keeping the certificate in use: %s", exc)
        if current[0] is not base:
            conn.context = current[0]

    base.sni_callback = pick
    return base


def read_token(path: Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace ignored); checked, never logged."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise CredentialsError(
            f"auth_token_file: cannot read {path}: {exc.strerror or exc}"
        ) from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise InvalidRequestError(
            f"auth_token_file: {path} holds more than {MAX_TOKEN_BYTES} bytes; it must hold the "
            "token only"
        )
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = None
    if token is not None and not token:
        raise InvalidRequestError(
            f"auth_token_file: {path} is empty; write a token into it (openssl rand -hex 32)"
        )
    # gRPC metadata values are printable ASCII; a token that cannot be sent can never match.
    if token is None or not all(33 <= ord(c) < 127 for c in token):
        raise InvalidRequestError(
            f"auth_token_file: the token in {path} must be printable ASCII without spaces"
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise InvalidRequestError(
            f"auth_token_file: the token in {path} must have at least {MIN_TOKEN_CHARS} "
            f"characters (it has {len(token)}); generate one with `openssl rand -hex 32`"
        )
    return token


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    serde = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **serde)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **serde)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **serde)
    return grpc.unary_unary_rpc_method_handler(deny, **serde)


MISSING = (
    "missing bearer token: this agent requires gRPC metadata 'authorization: Bearer <token>' "
    "on every inference and metadata call"
)
INVALID = "invalid bearer token in 'authorization' metadata"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC except grpc.health.v1 without ``authorization: Bearer <token>``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        warn_if_exposed(path, "inference token file")
        self._token = read_token(path).encode("ascii")
        self._refused = 0
        self._logged_at = 0.0

    def reload(self) -> None:
        """SIGHUP: read the file again; a file that no longer reads keeps the old token."""
        try:
            token = read_token(self.path).encode("ascii")
        except (CredentialsError, InvalidRequestError) as exc:
            log.error("inference token not reloaded, the previous one stays: %s", exc)
            return
        warn_if_exposed(self.path, "inference token file")
        if not hmac.compare_digest(token, self._token):
            self._token = token
            log.info("inference token reloaded from %s", self.path)

    def _check(self, metadata: Any) -> str:
        """'' when authorized, else why not."""
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return MISSING
        if len(values) > 1:
            return "ambiguous bearer token: more than one 'authorization' entry; send exactly one"
        value = values[0]
        value = value.encode("latin-1") if isinstance(value, str) else bytes(value)
        scheme, _, presented = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return "malformed bearer token: 'authorization' metadata must be 'Bearer <token>'"
        # Constant time: the comparison reveals nothing about how much of a guess was right.
        if not hmac.compare_digest(presented.strip(), self._token):
            return INVALID
        return ""

    def refusal(self, metadata: Any, what: str) -> str:
        """'' when ``metadata`` carries the token, else why not (refusals are counted and
        logged at most every REFUSAL_LOG_INTERVAL_S)."""
        why = self._check(metadata)
        if not why:
            return ""
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "refused %d inference call(s) without a valid bearer token (last: %s, %s)",
                self._refused,
                what,
                why.split(":")[0],
            )
            self._refused, self._logged_at = 0, now
        return why

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        why = self.refusal(details.invocation_metadata, details.method)
        if not why:
            return handler
        return _abort_handler(handler, why)
