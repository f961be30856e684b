"""The audit trail's store and request wording (hub/audit.py, hub/audit_edge.py), in-process.
The interceptor on a real hub, with a wrong identity and a kill -9: tests/test_audit.py."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import pytest

from modelfleet.hub.audit import MAX_LIMIT, UNFINISHED, AuditFileError, AuditStore
from modelfleet.hub.audit_edge import (
    AUDITED_SERVICES,
    METHOD_KINDS,
    METHOD_ROLES,
    PACKAGE,
    STRING_CHARS,
    RefusalBudget,
    describe,
    redact,
)
from modelfleet.hub.governance import ADMIN, OPERATOR, ROLES
from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.protos import fleet_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_every_admin_method_is_classified() -> None:
    # An unclassified method would be audited as a change: safe, but a new read would flood
    # the trail. Naming each one here makes adding a method a decision.
    for service in AUDITED_SERVICES:
        desc = pb.DESCRIPTOR.services_by_name[service]
        assert desc.full_name == f"{PACKAGE}.{service}"
        missing = [m.name for m in desc.methods if m.name not in METHOD_KINDS]
        assert missing == [], f"{service}: classify {missing} in hub/audit_edge.METHOD_KINDS"
        unroled = [m.name for m in desc.methods if m.name not in METHOD_ROLES]
        assert unroled == [], f"{service}: give {unroled} a role in hub/audit_edge.METHOD_ROLES"
    assert set(METHOD_ROLES.values()) <= set(ROLES)
    # What changes something needs at least an operator; an export at least an operator too.
    for method, kind in METHOD_KINDS.items():
        if kind in ("change", "export"):
            assert METHOD_ROLES[method] in (OPERATOR, ADMIN), method
    # Trust and personal data: admin only.
    for method in ("CreateToken", "RevokeAgent", "AddAdmin", "SetAdminRole", "QueryCapture"):
        assert METHOD_ROLES[method] == ADMIN, method


def test_entries_begin_unfinished_end_with_their_status_and_are_private(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / "audit.sqlite")
    assert stat.S_IMODE(os.stat(tmp_path / "audit.sqlite").st_mode) == 0o600
    entry = store.begin("admin:admin", "ipv4:127.0.0.1:1", "S", "Deploy", 'name: "m"')
    [e] = store.query()
    assert (e.code, e.identity, e.method, e.request) == (
        UNFINISHED,
        "admin:admin",
        "Deploy",
        'name: "m"',
    )
    store.end(entry, "NOT_FOUND", "no model 'm'", 1.5, 'name: "m"')
    [e] = store.query()
    assert (e.code, e.detail, e.duration_ms) == ("NOT_FOUND", "no model 'm'", 1.5)
    store.close()
    # Reopened (as after a restart): the entries are where they were.
    again = AuditStore(tmp_path / "audit.sqlite")
    assert [x.id for x in again.query()] == [entry]


def test_queries_filter_and_keep_the_newest(tmp_path: Path) -> None:
    clock = Clock()
    store = AuditStore(tmp_path / "a.sqlite", clock=clock)
    for i in range(30):
        clock.now += 1
        who = "admin:admin" if i % 2 else "agent:x"
        code = "OK" if i % 3 else "PERMISSION_DENIED"
        store.record(who, "p", "S", f"M{i % 5}", "", code, "", 0.1, clock.now)
    assert len(store.query(limit=MAX_LIMIT)) == 30
    newest = store.query(limit=5)
    assert [e.started_at for e in newest] == sorted(e.started_at for e in newest)
    assert newest[-1].started_at == clock.now
    assert all(e.identity == "agent:x" for e in store.query(identity="agent:x", limit=100))
    assert all(e.method == "M2" for e in store.query(method="M2"))
    assert {e.code for e in store.query(failed_only=True)} == {"PERMISSION_DENIED"}
    assert len(store.query(since=clock.now - 4.5)) == 5
    for bad in (-1, MAX_LIMIT + 1):
        with pytest.raises(InvalidRequestError, match="limit must be"):
            store.query(limit=bad)


def test_old_entries_are_pruned_at_start(tmp_path: Path) -> None:
    clock = Clock()
    store = AuditStore(tmp_path / "a.sqlite", retention_days=1, clock=clock)
    store.record("admin:admin", "p", "S", "Deploy", "", "OK", "", 0.1, clock.now)
    store.close()
    clock.now += 2 * 86400
    kept = AuditStore(tmp_path / "a.sqlite", retention_days=0, clock=clock)
    assert len(kept.query()) == 1  # 0 keeps everything
    kept.close()
    assert AuditStore(tmp_path / "a.sqlite", retention_days=1, clock=clock).query() == []


def test_requests_are_worded_without_secrets_or_bytes() -> None:
    text = describe(
        pb.AddWebhookRequest(name="ops", url="https://h/x", secret=b"s3cr3t-value", replace=True)
    )
    assert 'name: "ops"' in text and 'url: "https://h/x"' in text and "replace: True" in text
    assert "s3cr3t" not in text and "secret: <redacted, 12 bytes>" in text
    token = describe(pb.CreateTokenRequest(labels={"site": "lab"}, ttl_seconds=600))
    assert 'labels: {"site": "lab"}' in token and "ttl_seconds: 600" in token
    header = describe(pb.PublishChunk(header=pb.PublishHeader(name="m", version=3, size=10)))
    assert header == 'header: {name: "m" version: 3 size: 10}'
    assert describe(pb.PublishChunk(data=b"x" * 1000)) == "data: <1000 bytes>"
    many = describe(
        pb.DeployRequest(name="m", version=2, selector={f"k{i}": "v" for i in range(25)})
    )
    assert "... 5 more" in many


def test_credentials_inside_strings_are_redacted_whatever_the_field() -> None:
    assert redact("https://ops:pw@h.example/x") == "https://<redacted>@h.example/x"
    assert redact("s3://AKIA:sk@bucket/a.parquet") == "s3://<redacted>@bucket/a.parquet"
    assert (
        redact("https://h/x?team=ml&access_token=abc&api_key=k#f")
        == "https://h/x?team=ml&access_token=<redacted>&api_key=<redacted>#f"
    )
    # Addresses without credentials, and text that is not a URL, are left alone.
    for plain in ("https://h.example:8443/x?team=ml", "user@example.com", "a = 1 AND b = 2"):
        assert redact(plain) == plain
    job = describe(
        pb.CreateJobRequest(
            spec=pb.JobSpec(name="j", input="s3://AKIA:sk-123@b/in.parquet", keys="id,ts")
        )
    )
    assert "sk-123" not in job and "s3://<redacted>@b/in.parquet" in job
    # Public values whose field names contain "key": the signing key id, a job's id columns.
    assert 'keys: "id,ts"' in job
    commit = describe(pb.CommitTargetsRequest(name="m", version=1, keyid="ab12", signature="s"))
    assert 'keyid: "ab12"' in commit


def test_a_long_string_is_cut_with_its_length_and_digest_so_the_rest_is_kept() -> None:
    notes = "n" * 5000
    text = describe(pb.PublishHeader(name="m", version=2, notes=notes, size=10, sha256="f" * 64))
    assert f"<5000 chars, sha256 {hashlib.sha256(notes.encode()).hexdigest()}>" in text
    assert text.endswith(f'size: 10 sha256: "{"f" * 64}"') and len(text) < STRING_CHARS + 250
    # Something redacted from a long string: the digest is of what is kept, never of the
    # secret, and says so.
    doc = "x" * 300 + " postgres://u:pw-77@db/x"
    text = describe(pb.StateRequest(document=doc))
    assert "pw-77" not in text and "sha256 of the redacted text" in text
    assert hashlib.sha256(doc.encode()).hexdigest() not in text


def test_the_refusal_budget_counts_what_it_does_not_record() -> None:
    clock = Clock()
    budget = RefusalBudget(burst=3, per_s=0.5, clock=clock)
    assert [budget.take("") for _ in range(3)] == [0, 0, 0]
    assert [budget.take("") for _ in range(4)] == [None] * 4
    assert budget.take("agent:a") == 0  # each identity has its own
    clock.now += 2.0  # one refusal's worth
    assert budget.take("") == 4  # recorded, saying how many were not
    assert budget.take("") is None
    clock.now += 100.0
    assert [budget.take("") for _ in range(3)] == [1, 0, 0]  # refilled to the burst, no more


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_trail_is_refused_with_the_ways_out(tmp_path: Path, damage: str) -> None:
    # Starting a new trail on our own would hide the history an auditor asks for.
    path = tmp_path / "audit.sqlite"
    store = AuditStore(path)
    store.record("admin:admin", "p", "S", "Deploy", "", "OK", "", 0.1, 1.0)
    store.close()
    for side in tmp_path.glob("audit.sqlite-*"):
        side.unlink()
    path.write_bytes(b"not a database " * 500 if damage == "garbage" else path.read_bytes()[:50])
    with pytest.raises(AuditFileError) as refused:
        AuditStore(path)
    words = str(refused.value)
    assert str(path) in words and "restore" in words and "move it aside" in words
    path.rename(tmp_path / "audit.sqlite.damaged")
    assert AuditStore(path).query() == []  # the way out works: a new, empty trail


def test_the_audit_table_cannot_be_given_forged_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An error's message may quote what a caller sent (a query's line, a name): its newlines
    # and terminal escapes must not print as entries of their own or rewrite the screen.
    from modelfleet.hub import cli

    forged = "2026-12-07 23:59:59 UTC admin:admin            Deploy               OK"
    entry = pb.AuditEntry(
        started_at=1.0,
        identity="admin:vera",
        method="QueryCapture",
        request='model: "m"',
        code="INVALID_ARGUMENT",
        detail=f"syntax error\n{forged}\x1b[2K\x9b1A",
    )

    class Stub:
        def ListAudit(self, request: object, timeout: float = 0) -> pb.ListAuditResponse:
            return pb.ListAuditResponse(entries=[entry])

    monkeypatch.setattr(cli, "admin_stub", lambda args: Stub())
    assert cli.main(["audit"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("2026")] == []
    assert any(line.strip().startswith(forged) for line in lines)  # shown, under its entry
    assert "\x1b" not in "".join(lines) and "\x9b" not in "".join(lines)
    assert any("\\x1b[2K\\x9b1A" in line for line in lines)


@pytest.mark.parametrize("text", ["a." * 500_000, "?a" * 500_000, "://" + "a" * 1_000_000])
def test_redaction_takes_linear_time_on_hostile_strings(text: str) -> None:
    # Every request of every identity is described on the event loop: a regular expression
    # that backtracks on a 1 MB string would stop the hub.
    started = time.perf_counter()
    redact(text)
    describe(pb.DeployRequest(name=text))
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("name", ["admin", "Admin", "ADMIN", "aDmIn"])
def test_no_admin_may_pass_for_the_hubs_own_in_the_trail(tmp_path: Path, name: str) -> None:
    # admin:Admin would read like the hub's own admin:admin in `audit` and `admins ls`.
    from modelfleet.hub.governance import Admins
    from modelfleet.hub.registry import Registry

    admins = Admins(Registry(tmp_path / "registry.db"))
    with pytest.raises(InvalidRequestError, match="the hub's own admin identity"):
        admins.check_new(name, "viewer")
