"""Certificate renewal, in-process: the agent's renewal steps and crash recovery, the hub's admin
certificate. The end-to-end path (real hub and agent, a certificate outliving its predecessor)
is in test_fleet.py and test_mqtt.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import stat
import time
import types
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from modelfleet.agent.fleet import renew
from modelfleet.hub.app import ensure_admin_identity
from modelfleet.hub.ca import CertificateAuthority
from modelfleet.kernel.identity import (
    CredentialsError,
    agent_common_name,
    generate_key,
    load_certificate,
    make_csr,
    renewal_time,
    write_pem,
    write_private_key,
)

AGENT = "edge-1-abc123"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


@pytest.fixture
def ident(tmp_path: Path, ca: CertificateAuthority) -> Path:
    """An enrolled agent's identity directory, as `modelfleet-agent enroll` leaves it."""
    d = tmp_path / "identity"
    d.mkdir(mode=0o700)
    key = generate_key()
    write_private_key(d / "agent.key", key)
    write_pem(d / "agent.crt", ca.sign_csr(make_csr(key, "x"), agent_common_name(AGENT)))
    write_pem(d / "ca.crt", ca.cert_pem)
    return d


def hub(ca: CertificateAuthority, name: str = AGENT, days: float = 365) -> renew.Ask:
    """What the hub does with a renewal request, without the network."""

    async def ask(csr: bytes) -> bytes:
        return ca.sign_csr(csr, agent_common_name(name), days)

    return ask


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_renewal_time_is_a_month_ahead_or_half_the_lifetime(ca: CertificateAuthority) -> None:
    key = generate_key()
    year = load_certificate(ca.sign_csr(make_csr(key, "x"), "agent:a", 365))
    expected = year.not_valid_after_utc - dt.timedelta(days=30)
    assert renewal_time(year) == pytest.approx(expected.timestamp())
    # 60 s (plus the 5 minutes of clock skew before issue): renewed half way, not at once.
    short = load_certificate(ca.sign_csr(make_csr(key, "x"), "agent:a", 60 / 86400))
    lifetime = short.not_valid_after_utc - short.not_valid_before_utc
    middle = short.not_valid_before_utc + lifetime / 2
    assert renewal_time(short) == pytest.approx(middle.timestamp())


def test_renew_installs_a_new_key_and_certificate(ident: Path, ca: CertificateAuthority) -> None:
    old_key = (ident / "agent.key").read_bytes()
    old_cert = load_certificate((ident / "agent.crt").read_bytes())
    cert = asyncio.run(renew.renew(ident, hub(ca)))
    assert (ident / "agent.key").read_bytes() != old_key  # a new key, made on the node
    assert load_certificate((ident / "agent.crt").read_bytes()) == cert
    assert cert.serial_number != old_cert.serial_number
    assert cert.subject == old_cert.subject  # same agent id
    assert stat.S_IMODE(os.stat(ident / "agent.key").st_mode) == 0o600
    assert sorted(p.name for p in ident.iterdir()) == ["agent.crt", "agent.key", "ca.crt"]
    # The pair on disk belongs together.
    key = serialization.load_pem_private_key((ident / "agent.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()
    assert renew.finish_pending(ident) == ""


def _wrong_key(ca: CertificateAuthority) -> renew.Ask:
    async def ask(csr: bytes) -> bytes:
        return ca.sign_csr(make_csr(generate_key(), "x"), agent_common_name(AGENT))

    return ask


def _refused(_ca: CertificateAuthority) -> renew.Ask:
    async def ask(csr: bytes) -> bytes:
        raise ConnectionError("hub: unavailable")

    return ask


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (_wrong_key, "not for the key this agent sent"),
        (lambda ca: hub(ca, name="someone-else"), "names 'agent:someone-else'"),
        (
            lambda ca: hub(CertificateAuthority.load_or_create(ca.directory.parent / "evil")),
            "not issued by the hub's CA",
        ),
        (_refused, "hub: unavailable"),
    ],
    ids=["wrong-key", "wrong-name", "other-ca", "hub-down"],
)
def test_a_bad_or_missing_answer_keeps_the_working_identity(
    ident: Path, ca: CertificateAuthority, answer, error: str
) -> None:
    before = snapshot(ident)
    with pytest.raises((CredentialsError, ConnectionError), match=error):
        asyncio.run(renew.renew(ident, answer(ca)))
    assert snapshot(ident) == before  # nothing replaced, no half-made files left


def test_an_interrupted_renewal_is_completed_or_discarded(
    ident: Path, ca: CertificateAuthority
) -> None:
    old = snapshot(ident)
    # 1. Crash after the new key was written, before the hub answered: discarded.
    write_private_key(ident / renew.NEXT_KEY, generate_key())
    assert renew.finish_pending(ident) == "discarded"
    assert snapshot(ident) == old

    # 2. Crash after the answer was written, before anything moved: both move in.
    key = generate_key()
    cert = ca.sign_csr(make_csr(key, "x"), agent_common_name(AGENT))
    write_private_key(ident / renew.NEXT_KEY, key)
    write_pem(ident / renew.NEXT_CERT, cert)
    assert renew.finish_pending(ident) == "completed"
    assert (ident / "agent.crt").read_bytes() == cert
    assert (
        load_certificate(cert).public_key()
        == serialization.load_pem_private_key((ident / "agent.key").read_bytes(), None).public_key()
    )

    # 3. Crash between the two moves (key in, certificate not): the certificate follows.
    key2 = generate_key()
    cert2 = ca.sign_csr(make_csr(key2, "x"), agent_common_name(AGENT))
    write_private_key(ident / "agent.key", key2)
    write_pem(ident / renew.NEXT_CERT, cert2)
    assert renew.finish_pending(ident) == "completed"
    assert (ident / "agent.crt").read_bytes() == cert2

    # 4. A stray certificate for a key this node does not hold: discarded, identity kept.
    kept = snapshot(ident)
    stray = ca.sign_csr(make_csr(generate_key(), "x"), agent_common_name(AGENT))
    write_pem(ident / renew.NEXT_CERT, stray)
    assert renew.finish_pending(ident) == "discarded"
    assert snapshot(ident) == kept


def test_hub_renews_the_admin_certificate_when_due(tmp_path: Path, ca: CertificateAuthority):
    core = types.SimpleNamespace(
        paths=types.SimpleNamespace(admin=tmp_path / "admin"),
        cfg=types.SimpleNamespace(agent_cert_lifetime_s=365 * 86400),
        ca=ca,
    )
    ensure_admin_identity(core)  # type: ignore[arg-type]
    key = (tmp_path / "admin" / "admin.key").read_bytes()
    first = load_certificate((tmp_path / "admin" / "admin.crt").read_bytes())
    ensure_admin_identity(core)  # type: ignore[arg-type]  # not due: untouched
    assert load_certificate((tmp_path / "admin" / "admin.crt").read_bytes()) == first
    # Eleven months later (the refresher's check): a new certificate for the same key and name.
    later = first.not_valid_before_utc.timestamp() + 340 * 86400
    ensure_admin_identity(core, now=later)  # type: ignore[arg-type]
    second = load_certificate((tmp_path / "admin" / "admin.crt").read_bytes())
    assert second.serial_number != first.serial_number
    assert second.subject == first.subject
    assert (tmp_path / "admin" / "admin.key").read_bytes() == key


def test_agents_ls_warns_only_when_renewal_is_overdue() -> None:
    from modelfleet.hub.cli import _cert_warning

    now = 1_000_000_000.0
    assert _cert_warning(0.0, now) == ""  # not recorded (enrolled by an older hub)
    assert _cert_warning(now + 100 * 86400, now) == ""
    assert _cert_warning(now + 20 * 86400, now) == ""  # renewal window, not overdue yet
    assert "expires in 3.0 days" in _cert_warning(now + 3 * 86400, now)
    assert "EXPIRED" in _cert_warning(now - 1, now)


def test_leftovers_of_another_identity_or_unreadable_files_are_not_installed(
    ident: Path, ca: CertificateAuthority
) -> None:
    kept = snapshot(ident)
    # A complete renewal of an earlier identity (another agent id), e.g. left behind before an
    # `enroll --force`: it must not replace the identity in use.
    key = generate_key()
    write_private_key(ident / renew.NEXT_KEY, key)
    write_pem(ident / renew.NEXT_CERT, ca.sign_csr(make_csr(key, "x"), "agent:old-id-000000"))
    assert renew.finish_pending(ident) == "discarded"
    assert snapshot(ident) == kept
    # A truncated pending certificate: set aside, the agent still starts with its identity.
    write_private_key(ident / renew.NEXT_KEY, generate_key())
    (ident / renew.NEXT_CERT).write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB")
    assert renew.finish_pending(ident) == "discarded"
    assert (ident / "agent.crt").read_bytes() == kept["agent.crt"]
    assert (ident / "agent.key").read_bytes() == kept["agent.key"]
    assert (ident / (renew.NEXT_CERT + ".bad")).exists()
    assert not (ident / renew.NEXT_CERT).exists() and not (ident / renew.NEXT_KEY).exists()
    # enroll --force starts by forgetting any renewal in progress.
    write_private_key(ident / renew.NEXT_KEY, generate_key())
    renew.discard_pending(ident)
    assert not (ident / renew.NEXT_KEY).exists()


def test_a_node_clock_behind_the_hub_still_accepts_its_new_certificate(
    ident: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Certificates are valid from 5 minutes before issue; this node's clock is 10 minutes late.
    late = time.time() - 600
    monkeypatch.setattr(renew.time, "time", lambda: late)
    cert = asyncio.run(renew.renew(ident, hub(ca)))
    assert cert.not_valid_before_utc.timestamp() > late
    assert (ident / "agent.crt").read_bytes() == cert.public_bytes(serialization.Encoding.PEM)


def test_hub_checks_the_proof_of_a_renewal_sent_through_the_broker(
    ident: Path, ca: CertificateAuthority, tmp_path: Path
) -> None:
    from modelfleet.hub.core import HubCore
    from modelfleet.hub.registry import PermissionDeniedError

    core = types.SimpleNamespace(ca=ca)
    csr = make_csr(generate_key(), "x")
    cert_pem, signature = renew.proof(ident, csr)

    def check(cert: bytes, sig: bytes | None, agent: str = AGENT) -> str:
        return HubCore._presented_certificate(core, agent, cert, csr, sig)  # type: ignore[arg-type]

    assert check(cert_pem, signature).startswith("sha256:")
    with pytest.raises(PermissionDeniedError, match="not signed by the key"):
        check(cert_pem, b"")  # no signature
    with pytest.raises(PermissionDeniedError, match="not signed by the key"):
        check(cert_pem, renew.proof(ident, b"another CSR")[1])  # a signature over other bytes
    with pytest.raises(PermissionDeniedError, match="not agent other-agent's"):
        check(cert_pem, signature, agent="other-agent")
    evil = CertificateAuthority.load_or_create(tmp_path / "evil")
    forged = evil.sign_csr(make_csr(generate_key(), "x"), agent_common_name(AGENT))
    with pytest.raises(PermissionDeniedError, match="not from this hub's CA"):
        check(forged, None)
