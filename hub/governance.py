"""Admin roles: who may do what on the hub (docs/security.md#admin-roles).

Three roles, each allowed what the one before is and more:
- ``viewer`` reads the registry, the fleet, rollouts, metrics, alerts;
- ``operator`` also changes what runs: publish, stage, deploy, rollouts, experiments, jobs,
  alert rules, state files;
- ``admin`` also manages trust and data: enrollment tokens, revocations, admins and their roles,
  webhooks (where alerts go), capture of inference data and its queries, backups, the audit
  trail.

The hub's own identity, ``admin:admin`` (created at first start in ``HUB_DATA/admin``, readable
by the hub's user only), always has the admin role. Others are added with a certificate the hub
signs for a key their owner keeps; the registry binds the name to that key, so a replaced or
revoked admin's old certificate is refused although the CA signed it and it has not expired.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from modelfleet.hub.ports import RegistryPort
from modelfleet.hub.registry import AdminRow, PermissionDeniedError
from modelfleet.kernel.errors import InvalidRequestError, ModelfleetError, Status
from modelfleet.kernel.identity import IdentityError, admin_common_name

VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
ROLES = (VIEWER, OPERATOR, ADMIN)
# The hub's own admin identity (HUB_DATA/admin): always the admin role, never in the registry.
BUILT_IN = "admin"
ACTIVE, REVOKED = "active", "revoked"


class AlreadyExistsError(ModelfleetError):
    status = Status.ALREADY_EXISTS
    reason = "admin_exists"


class NotFoundError(ModelfleetError):
    status = Status.NOT_FOUND
    reason = "admin_not_found"


def check_role(role: str) -> str:
    if role not in ROLES:
        raise InvalidRequestError(
            f"unknown role {role!r}: use one of {', '.join(ROLES)} (docs/security.md#admin-roles)"
        )
    return role


def allows(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


def key_sha256(public_key: object) -> str:
    """SHA-256 of a public key's SubjectPublicKeyInfo (DER), hex."""
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _check_name(name: str) -> str:
    try:
        admin_common_name(name)
    except IdentityError as exc:
        raise InvalidRequestError(str(exc)) from None
    # Case variants too: admin:Admin would read like the hub's own in `audit` and `admins ls`.
    if name.lower() == BUILT_IN:
        raise InvalidRequestError(
            f"{name!r} is the hub's own admin identity (HUB_DATA/admin), or reads like it; "
            "choose another name"
        )
    return name


class Admins:
    """Named admins over the registry; the role a presented certificate has."""

    def __init__(self, registry: RegistryPort, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.clock = clock

    def role_of(self, name: str, cert_pem: bytes) -> str:
        """The role of ``admin:name`` presenting ``cert_pem`` (already verified by TLS against
        the hub's CA); refuses a name the hub does not know, a revoked one, and a certificate
        for another key than the one the name is bound to."""
        if name == BUILT_IN:
            return ADMIN
        row = self.registry.get_admin(name)
        if row is None:
            raise PermissionDeniedError(
                f"admin:{name} is not an admin of this hub; an admin adds one with "
                "`modelfleet-hub admins add`"
            )
        if row.status != ACTIVE:
            raise PermissionDeniedError(
                f"admin:{name} was revoked by {row.updated_by or '?'}; an admin can add it "
                "again with `modelfleet-hub admins add --replace`"
            )
        try:
            presented = key_sha256(x509.load_pem_x509_certificate(cert_pem).public_key())
        except ValueError:
            raise PermissionDeniedError("the client certificate could not be read") from None
        if presented != row.key_sha256:
            raise PermissionDeniedError(
                f"this certificate of admin:{name} is for a key the hub no longer accepts "
                "(the admin was added again with another key): use the newest one"
            )
        return row.role

    def check_new(self, name: str, role: str, replace: bool = False) -> AdminRow | None:
        """Refuse an add before anything is signed; the admin it replaces, if any."""
        _check_name(name)
        check_role(role)
        existing = self.registry.get_admin(name)
        if existing is not None and not replace:
            raise AlreadyExistsError(
                f"admin:{name} exists ({existing.role}, {existing.status}); pass --replace to "
                "issue a new certificate for a new key (the old one is then refused)"
            )
        return existing

    def add(
        self,
        name: str,
        role: str,
        public_key: object,
        cert_expires_at: float,
        by: str,
        replace: bool = False,
    ) -> AdminRow:
        existing = self.check_new(name, role, replace)
        now = self.clock()
        row = AdminRow(
            name=name,
            role=role,
            status=ACTIVE,
            key_sha256=key_sha256(public_key),
            created_at=existing.created_at if existing is not None else now,
            created_by=existing.created_by if existing is not None else by,
            cert_expires_at=cert_expires_at,
            updated_at=now,
            updated_by=by,
        )
        self.registry.put_admin(row)
        return row

    def set_role(self, name: str, role: str, by: str) -> AdminRow:
        check_role(role)
        self._existing(name)
        self.registry.update_admin(name, role=role, by=by)
        return self._existing(name)

    def revoke(self, name: str, by: str) -> AdminRow:
        self._existing(name)
        self.registry.update_admin(name, status=REVOKED, by=by)
        return self._existing(name)

    def _existing(self, name: str) -> AdminRow:
        if name == BUILT_IN:
            raise InvalidRequestError(
                "admin:admin is the hub's own identity and always has the admin role; protect "
                "HUB_DATA/admin instead (docs/security.md#admin-roles)"
            )
        row = self.registry.get_admin(name)
        if row is None:
            known = ", ".join(a.name for a in self.registry.admins()) or "none"
            raise NotFoundError(f"no admin named {name!r} (admins: {known})")
        return row

    def all(self) -> list[AdminRow]:
        return self.registry.admins()
