"""Admin roles on a real hub (docs/security.md#admin-roles): each admin action called with an
identity whose role does not allow it, a role changed while the hub runs, a revoked admin, and
an admin replaced with a new key whose old certificate (signed by the same CA, not expired) is
then refused. Every refusal names the role, what the call needs and the way out, and lands in the
audit trail under the caller's identity."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import models
from tests.procs import HubProcess

EXIT_PERMISSION_DENIED = 9  # docs/cli.md#exit-codes


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("roles")
    h = HubProcess(work / "hub", log_path=work / "hub.log").start()
    h.cli("publish", "mlp", str(models.mlp(work / "m.onnx")), "--version", "1")
    yield h
    h.stop()


def as_admin(hub: HubProcess, folder: Path, *args: str) -> subprocess.CompletedProcess:
    return hub.cli("--admin-dir", str(folder), *args, check=False)  # type: ignore[return-value]


def refused(r: subprocess.CompletedProcess, *words: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == EXIT_PERMISSION_DENIED, out
    assert "Traceback" not in out, out
    for w in words:
        assert w in out, out


def test_each_role_gets_what_it_may_and_a_clear_refusal_otherwise(hub, tmp_path: Path) -> None:
    viewer, operator = tmp_path / "viewer", tmp_path / "operator"
    out = hub.cli("admins", "add", "vera", "--role", "viewer", "--out", str(viewer))
    assert "admin:vera added with the viewer role" in out
    hub.cli("admins", "add", "otto", "--role", "operator", "--out", str(operator))
    assert oct((viewer / "admin.key").stat().st_mode & 0o777) == "0o600"

    # viewer: reads, nothing else
    assert as_admin(hub, viewer, "models", "ls").returncode == 0
    refused(
        as_admin(hub, viewer, "deploy", "mlp", "1", "--allow-empty"),
        "admin:vera has the viewer role; Deploy needs operator",
        "admins set-role vera operator",
    )
    # operator: changes what runs, but not trust or data
    assert as_admin(hub, operator, "deploy", "mlp", "1", "--allow-empty").returncode == 0
    for args, method in (
        (("agents", "token"), "CreateToken"),
        (("admins", "add", "eve", "--role", "admin", "--out", str(tmp_path / "eve")), "AddAdmin"),
        (("admins", "set-role", "otto", "admin"), "SetAdminRole"),
        (("audit",), "ListAudit"),
        (("backup", str(tmp_path / "bk")), "Backup"),
    ):
        refused(as_admin(hub, operator, *args), f"{method} needs admin")
    assert not (tmp_path / "eve").exists()  # refused before anything was written

    # A role changed while the hub runs applies to the next call.
    hub.cli("admins", "set-role", "vera", "operator")
    assert as_admin(hub, viewer, "deploy", "mlp", "1", "--allow-empty").returncode == 0

    # Revoked: refused from the next call on, reads too.
    hub.cli("admins", "revoke", "otto")
    refused(as_admin(hub, operator, "models", "ls"), "admin:otto was revoked by admin:admin")

    # Replaced with a new key: the old certificate, which the CA signed and which has not
    # expired, is refused; the new one works.
    renewed = tmp_path / "viewer-2"
    hub.cli("admins", "add", "vera", "--role", "viewer", "--out", str(renewed), "--replace")
    refused(as_admin(hub, viewer, "models", "ls"), "for a key the hub no longer accepts")
    assert as_admin(hub, renewed, "models", "ls").returncode == 0

    listed = {a["name"]: a for a in json.loads(hub.cli("admins", "ls", "--json"))}
    assert listed["admin"]["role"] == "admin" and listed["admin"]["created_by"] == "hub"
    assert (listed["vera"]["role"], listed["vera"]["status"]) == ("viewer", "active")
    assert (listed["otto"]["status"], listed["otto"]["updated_by"]) == ("revoked", "admin:admin")

    # Every refusal is in the audit trail under the identity that tried.
    trail = json.loads(hub.cli("audit", "--failed", "--json", "--limit", "1000"))
    tried = {(e["identity"], e["method"]) for e in trail if e["code"] == "PERMISSION_DENIED"}
    assert ("admin:vera", "Deploy") in tried and ("admin:otto", "CreateToken") in tried
    assert ("admin:otto", "ListModels") in tried  # the revoked admin's read


def test_mistakes_in_admin_management_are_refused_with_the_way_out(hub, tmp_path: Path) -> None:
    r = hub.cli(
        "admins", "add", "admin", "--role", "viewer", "--out", str(tmp_path / "a"), check=False
    )
    assert r.returncode != 0 and "the hub's own admin identity" in r.stderr, r.stderr
    hub.cli("admins", "add", "ana", "--role", "viewer", "--out", str(tmp_path / "ana"))
    again = hub.cli(
        "admins", "add", "ana", "--role", "viewer", "--out", str(tmp_path / "ana2"), check=False
    )
    assert again.returncode != 0 and "pass --replace" in again.stderr, again.stderr
    assert not (tmp_path / "ana2").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    r = hub.cli("admins", "add", "bo", "--role", "viewer", "--out", str(busy), check=False)
    assert r.returncode != 0 and "not a new or empty folder" in r.stderr, r.stderr
    r = hub.cli("admins", "set-role", "nobody", "viewer", check=False)
    assert r.returncode != 0 and "no admin named 'nobody'" in r.stderr, r.stderr
    r = hub.cli("admins", "revoke", "admin", check=False)
    assert r.returncode != 0 and "always has the admin role" in r.stderr, r.stderr
