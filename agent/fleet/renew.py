"""Certificate renewal: before its certificate expires, the agent generates a new key on the node
and asks the hub, authenticated by the current certificate, for a certificate for it.

The agent id stays the same, so labels, desired state and revocation carry over. Files in
``identity/``::

    agent.key, agent.crt         the identity in use
    agent.next.key               a renewal in progress: the new key, written before asking
    agent.next.crt               the hub's answer, checked, written before either is moved in

The two are moved in key first, then certificate. A crash anywhere leaves either the old pair,
or files that :func:`finish_pending` (called before the identity is read at start-up) completes
or discards: an agent never starts with a key and a certificate that do not match.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from modelfleet.kernel.atomic import fsync_dir
from modelfleet.kernel.identity import (
    RENEW_BEFORE_S,
    CredentialsError,
    certificate_common_name,
    generate_key,
    load_certificate,
    load_private_key,
    make_csr,
    renewal_time,
    write_pem,
    write_private_key,
)

log = logging.getLogger(__name__)

KEY, CERT, CA = "agent.key", "agent.crt", "ca.crt"
NEXT_KEY, NEXT_CERT = "agent.next.key", "agent.next.crt"

# Asks the hub: CSR (PEM) in, the certificate the hub issued (PEM) out (ControlPlane).
Ask = Callable[[bytes], Awaitable[bytes]]


def current_certificate(ident: Path) -> x509.Certificate:
    try:
        return load_certificate((ident / CERT).read_bytes())
    except OSError as exc:
        raise CredentialsError(f"cannot read {ident / CERT} (enrolled?): {exc}") from None


def due_at(ident: Path, before_s: float = RENEW_BEFORE_S) -> float:
    """When (epoch seconds) the certificate in use should be renewed."""
    return renewal_time(current_certificate(ident), before_s)


def finish_pending(ident: Path) -> str:
    """Complete or discard a renewal that a crash interrupted; returns what was done.

    ``"completed"``: the checked new certificate (and its key, if not yet moved) moved in.
    ``"discarded"``: a new key without a certificate, a certificate for a key we lack or for
    another name (left over from before an ``enroll --force``), or a file that does not parse
    (kept aside as ``*.bad``): the identity in use stays.
    ``""``: nothing was pending.
    """
    next_key, next_cert = ident / NEXT_KEY, ident / NEXT_CERT
    done = ""
    if next_cert.exists():
        try:
            pending = load_certificate(next_cert.read_bytes())
            wanted = pending.public_key()
            same_name = certificate_common_name(pending) == certificate_common_name(
                current_certificate(ident)
            )
            new_key = next_key.exists() and load_private_key(next_key).public_key() == wanted
        except (CredentialsError, ValueError) as exc:
            log.warning("setting aside an unreadable renewal file in %s: %s", ident, exc)
            _set_aside(next_cert)
            _set_aside(next_key)
            same_name = new_key = False
        if same_name and new_key:
            os.replace(next_key, ident / KEY)
        if same_name and load_private_key(ident / KEY).public_key() == wanted:
            os.replace(next_cert, ident / CERT)
            done = "completed"
        else:
            next_cert.unlink(missing_ok=True)
            done = "discarded"
    if next_key.exists():
        next_key.unlink()  # the hub never answered: the next attempt makes a new key
        done = done or "discarded"
    if done:
        fsync_dir(ident)
    return done


def discard_pending(ident: Path) -> None:
    """Forget any renewal in progress (a new enrollment replaces the identity)."""
    for name in (NEXT_KEY, NEXT_CERT):
        (ident / name).unlink(missing_ok=True)


def _set_aside(path: Path) -> None:
    if path.exists():
        os.replace(path, path.with_name(path.name + ".bad"))


def proof(ident: Path, csr_pem: bytes) -> tuple[bytes, bytes]:
    """(certificate in use, signature over the CSR with its key), for a renewal sent through
    the MQTT broker, which ends TLS before the hub could see who holds the key."""
    key = load_private_key(ident / KEY)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{ident / KEY} is not an ECDSA key; cannot sign a renewal")
    return (ident / CERT).read_bytes(), key.sign(csr_pem, ec.ECDSA(hashes.SHA256()))


def check_answer(ident: Path, name: str, key: object, cert_pem: bytes) -> x509.Certificate:
    """The hub's certificate must be for our new key and our name (the CN ``agent:<id>`` of
    the certificate in use), issued by our CA, and not expired.

    Anything else is refused before it can replace a working identity.
    """
    cert = load_certificate(cert_pem)
    if cert.public_key() != key.public_key():  # type: ignore[attr-defined]
        raise CredentialsError("the renewed certificate is not for the key this agent sent")
    got = certificate_common_name(cert)
    if got != name:
        raise CredentialsError(f"the renewed certificate names {got!r}, not this agent ({name})")
    ca = load_certificate((ident / CA).read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as exc:
        raise CredentialsError(
            f"the renewed certificate is not issued by the hub's CA this agent trusts: {exc}"
        ) from None
    # Only the end is checked: a node whose clock lags the hub's by more than the 5 minutes
    # certificates are backdated would otherwise refuse every answer.
    if cert.not_valid_after_utc.timestamp() <= time.time():
        raise CredentialsError(
            f"the renewed certificate has already expired ({cert.not_valid_after_utc}); is "
            f"this node's clock right?"
        )
    return cert


async def renew(ident: Path, ask: Ask) -> x509.Certificate:
    """One renewal: new key, CSR, the hub's certificate checked, both moved in. Returns it.

    The agent's name comes from the certificate in use, which is what the hub goes by too.
    """
    finish_pending(ident)
    name = certificate_common_name(current_certificate(ident))
    key = generate_key()
    write_private_key(ident / NEXT_KEY, key)
    try:
        cert_pem = await ask(make_csr(key, name))
        cert = check_answer(ident, name, key, cert_pem)
    except BaseException:
        (ident / NEXT_KEY).unlink(missing_ok=True)
        raise
    write_pem(ident / NEXT_CERT, cert_pem)
    finish_pending(ident)
    return cert
