"""Issue 12, items 1 and 2, in-process: what a compromised hub may ask the targets key to sign.

The hub process is the attacker here: it hands the signing CLI any payload and any "published
targets" it likes. ``check_signing_request`` runs on the key holder's machine and must refuse
everything but "the targets this key signed last, plus exactly my one bundle"; the hub's own
checks (commit, reload) refuse changes to published targets and metadata that does not verify.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, TargetFile, Targets

from modelfleet.hub.signing import (
    ExpectedTarget,
    RepositoryIntegrityError,
    TufRepository,
    check_signing_request,
    init_keys,
    load_signer,
)
from modelfleet.kernel.errors import VerificationError

A, B, EVIL = "aa" * 32, "bb" * 32, "ee" * 32


@pytest.fixture
def repo(tmp_path: Path) -> TufRepository:
    init_keys(tmp_path / "keys", offline_dir=tmp_path / "offline")
    r = TufRepository.create(
        tmp_path / "tuf",
        tmp_path / "keys",
        root_signer=load_signer(tmp_path / "offline" / "root.pem"),
        targets_signer=load_signer(tmp_path / "offline" / "targets.pem"),
    )
    key = load_signer(tmp_path / "offline" / "targets.pem")
    r.add_target("m/1/bundle.tar", 100, A, {"name": "m", "version": 1}, targets_signer=key)
    return r


def _key(tmp_path: Path) -> CryptoSigner:
    return load_signer(tmp_path / "offline" / "targets.pem")


def _expected(version: int = 2, sha: str = B) -> ExpectedTarget:
    return ExpectedTarget(f"m/{version}/bundle.tar", sha, 200)


def _payload(repo: TufRepository, **targets: TargetFile) -> bytes:
    """Targets as a malicious hub might stage them: published + whatever it likes."""
    base: Targets = Metadata.from_bytes(repo.published_targets_bytes()).signed
    new = Targets(
        version=base.version + 1,
        expires=base.expires,
        targets={**base.targets, **{t.path: t for t in targets.values()}},
    )
    return Metadata(new).signed_bytes


def _t(path: str, sha: str, length: int = 200) -> TargetFile:
    name, version = path.split("/")[:2]
    return TargetFile(
        length, {"sha256": sha}, path, {"custom": {"name": name, "version": int(version)}}
    )


def test_the_honest_request_is_signed(repo: TufRepository, tmp_path: Path) -> None:
    payload = repo.stage_target("m/2/bundle.tar", 200, B, {"name": "m", "version": 2})
    targets, extras = check_signing_request(
        payload, repo.published_targets_bytes(), _key(tmp_path).public_key, _expected()
    )
    assert set(targets.signed.targets) == {"m/1/bundle.tar", "m/2/bundle.tar"} and not extras


def test_an_extra_staged_target_is_refused_unless_named(repo: TufRepository, tmp_path) -> None:
    payload = _payload(repo, a=_t("m/2/bundle.tar", B), b=_t("m/3/bundle.tar", EVIL))
    base, key = repo.published_targets_bytes(), _key(tmp_path).public_key
    with pytest.raises(VerificationError, match=r"also adds m/3/bundle\.tar"):
        check_signing_request(payload, base, key, _expected())
    _, extras = check_signing_request(
        payload, base, key, _expected(), allow_extra=["m/3/bundle.tar"]
    )
    assert extras and EVIL in extras[0]


def test_a_changed_published_target_is_always_refused(repo: TufRepository, tmp_path) -> None:
    payload = _payload(repo, a=_t("m/2/bundle.tar", B), b=_t("m/1/bundle.tar", EVIL, 100))
    with pytest.raises(VerificationError, match=r"m/1/bundle\.tar changes"):
        check_signing_request(
            payload,
            repo.published_targets_bytes(),
            _key(tmp_path).public_key,
            _expected(),
            allow_extra=["m/1/bundle.tar"],
        )


def test_another_digest_than_the_one_built_is_refused(repo: TufRepository, tmp_path) -> None:
    payload = _payload(repo, a=_t("m/2/bundle.tar", EVIL))
    with pytest.raises(VerificationError, match="you built sha256"):
        check_signing_request(
            payload, repo.published_targets_bytes(), _key(tmp_path).public_key, _expected()
        )


def test_a_base_not_signed_by_this_key_is_refused(repo: TufRepository, tmp_path) -> None:
    # A forged "published targets": valid metadata, signed by a key the hub made up.
    forged = Metadata.from_bytes(repo.published_targets_bytes())
    forged.signed.targets["m/1/bundle.tar"] = _t("m/1/bundle.tar", EVIL, 100)
    forged.sign(CryptoSigner.generate_ed25519(), append=False)
    with pytest.raises(VerificationError, match="not signed by this targets key"):
        check_signing_request(
            _payload(repo, a=_t("m/2/bundle.tar", B)),
            forged.to_bytes(),
            _key(tmp_path).public_key,
            _expected(),
        )
    # The key's signature kept but the content changed: the signature no longer verifies.
    tampered = Metadata.from_bytes(repo.published_targets_bytes())
    tampered.signed.targets["m/1/bundle.tar"] = _t("m/1/bundle.tar", EVIL, 100)
    with pytest.raises(VerificationError, match="not signed by this targets key"):
        check_signing_request(
            _payload(repo, a=_t("m/2/bundle.tar", B)),
            tampered.to_bytes(),
            _key(tmp_path).public_key,
            _expected(),
        )


def test_a_skipped_version_or_far_expiry_is_refused(repo: TufRepository, tmp_path) -> None:
    base: Targets = Metadata.from_bytes(repo.published_targets_bytes()).signed
    for version, expires in ((base.version + 5, base.expires), (base.version + 1, None)):
        new = Targets(
            version=version, targets={**base.targets, "m/2/bundle.tar": _t("m/2/bundle.tar", B)}
        )
        if expires is not None:
            new.expires = expires
        else:
            new.expires = new.expires.fromtimestamp(
                time.time() + 10 * 366 * 86400, base.expires.tzinfo
            )
        with pytest.raises(VerificationError, match="refusing to sign"):
            check_signing_request(
                Metadata(new).signed_bytes,
                repo.published_targets_bytes(),
                _key(tmp_path).public_key,
                _expected(),
            )


def test_hub_commit_refuses_a_change_to_a_published_target(repo: TufRepository, tmp_path) -> None:
    # Even signed by the real key (a key holder tricked by an older CLI): the hub refuses it.
    payload = _payload(repo, a=_t("m/1/bundle.tar", EVIL, 100))
    sig = _key(tmp_path).sign(payload)
    with pytest.raises(VerificationError, match="published bundles are immutable"):
        repo.commit_staged_targets(sig.to_dict(), payload)
    assert repo.target("m/1/bundle.tar").hashes == {"sha256": A}


def test_hub_reload_refuses_a_rolled_back_targets(repo: TufRepository, tmp_path: Path) -> None:
    key = _key(tmp_path)
    repo.add_target("m/2/bundle.tar", 200, B, {"name": "m", "version": 2}, targets_signer=key)
    # Someone with the online keys points the snapshot back at targets v2 (without m/2) in a
    # second hub process: this one must not adopt it.
    other = TufRepository.open(tmp_path / "tuf", tmp_path / "keys")
    snap_meta = dict(other._snapshot.signed.meta)
    old = (tmp_path / "tuf" / "2.targets.json").read_bytes()
    snap_meta["targets.json"] = type(snap_meta["targets.json"])(
        2, len(old), {"sha256": hashlib.sha256(old).hexdigest()}
    )
    other._publish_snapshot(snap_meta)
    with pytest.raises(RepositoryIntegrityError, match="rollback"):
        repo.targets()
    with pytest.raises(RepositoryIntegrityError):
        repo.read("timestamp.json")


def test_hub_reload_refuses_a_root_json_outside_the_chain(repo: TufRepository, tmp_path) -> None:
    root = json.loads((tmp_path / "tuf" / "root.json").read_bytes())
    root["signed"]["expires"] = "2099-01-01T00:00:00Z"  # signature no longer matches
    (tmp_path / "tuf" / "root.json").write_text(json.dumps(root))
    with pytest.raises(RepositoryIntegrityError, match=r"root\.json is not a root of the"):
        repo.targets()


def test_a_root_chain_swapped_on_disk_is_refused(repo: TufRepository, tmp_path: Path) -> None:
    # The attacker writes a complete repository of their own (own root, own keys) over the
    # hub's metadata directory: valid on its own, but not chained to the root the hub trusts.
    init_keys(tmp_path / "evil-keys")
    evil = TufRepository.create(tmp_path / "evil", tmp_path / "evil-keys")
    evil.add_target("m/2/bundle.tar", 200, EVIL, {"name": "m", "version": 2})
    for f in (tmp_path / "evil").glob("*.json"):
        (tmp_path / "tuf" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RepositoryIntegrityError, match=r"changed on disk|not signed"):
        repo.targets()
    with pytest.raises(RepositoryIntegrityError):
        repo.root_bytes()
    # A restarted hub checks 1.root.json against the anchor it recorded in its keys directory.
    with pytest.raises(RepositoryIntegrityError, match="not the root this hub was created with"):
        TufRepository.open(tmp_path / "tuf", tmp_path / "keys")


def test_a_base_older_than_what_this_key_signed_last_is_refused(
    repo: TufRepository, tmp_path: Path
) -> None:
    key = _key(tmp_path)
    old_base = repo.published_targets_bytes()
    repo.add_target("m/2/bundle.tar", 200, B, {"name": "m", "version": 2}, targets_signer=key)
    signed_now = Metadata.from_bytes(repo.published_targets_bytes())
    last = (signed_now.signed.version, hashlib.sha256(signed_now.signed_bytes).hexdigest())
    # A hub whose snapshot was pointed back at the older targets offers it as the base: the
    # payload would be a fork that re-uses version numbers.
    forked = Targets(
        version=Metadata.from_bytes(old_base).signed.version + 1,
        targets={
            **Metadata.from_bytes(old_base).signed.targets,
            "m/2/bundle.tar": _t("m/2/bundle.tar", EVIL),
        },
    )
    with pytest.raises(VerificationError, match="rolled back or forked"):
        check_signing_request(
            Metadata(forked).signed_bytes,
            old_base,
            key.public_key,
            _expected(sha=EVIL),
            last_signed=last,
        )
    # The same version with other content (a second file for one version) too.
    other = Metadata.from_bytes(repo.published_targets_bytes())
    other.signed.targets["m/9/bundle.tar"] = _t("m/9/bundle.tar", EVIL)
    other.sign(key, append=False)
    with pytest.raises(VerificationError, match="rolled back or forked"):
        check_signing_request(
            _payload(repo, a=_t("m/3/bundle.tar", B)),
            other.to_bytes(),
            key.public_key,
            _expected(3),
            last_signed=last,
        )


def test_changed_custom_fields_of_a_published_target_are_refused(
    repo: TufRepository, tmp_path: Path
) -> None:
    changed = TargetFile(
        100, {"sha256": A}, "m/1/bundle.tar", {"custom": {"name": "other", "version": 99}}
    )
    payload = _payload(repo, a=_t("m/2/bundle.tar", B), b=changed)
    with pytest.raises(VerificationError, match="changes its custom fields"):
        check_signing_request(
            payload, repo.published_targets_bytes(), _key(tmp_path).public_key, _expected()
        )
    with pytest.raises(VerificationError, match="changes its custom fields"):
        repo.commit_staged_targets(_key(tmp_path).sign(payload).to_dict(), payload)
