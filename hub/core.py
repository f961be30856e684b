"""The hub's core: publishing, signing, enrollment, desired state, fleet queries. No gRPC in here.

The edges (the gRPC servicers in hub/server.py, the MQTT bridge in hub/mqtt.py) authenticate
the caller, convert messages to domain types (hub/convert.py) and call these methods (and
``jobs``, ``rollouts``); they do not reach into the registry. Errors are :mod:`kernel.errors`
types mapped once at each edge.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfleet.hub.backup import (
    BackupFile,
    BackupSummary,
    backup_stream,
    finish_restore,
    remove_stale_staging,
)
from modelfleet.hub.blobs import BlobStore
from modelfleet.hub.ca import CertificateAuthority
from modelfleet.hub.config import HubConfig
from modelfleet.hub.deployments import Deployments
from modelfleet.hub.jobs import Jobs
from modelfleet.hub.registry import (
    AgentRow,
    DeploymentRow,
    Desired,
    FailedPreconditionError,
    PermissionDeniedError,
    Registry,
    VersionRow,
    check_labels,
    check_notes,
    check_version,
    selector_matches,
)
from modelfleet.hub.signing import (
    ExpiryPolicy,
    RepositoryIntegrityError,
    TargetsKeyRequiredError,
    TufRepository,
    init_keys,
)
from modelfleet.kernel.atomic import try_lock
from modelfleet.kernel.bundle import (
    NAME_RE,
    NAME_RULE,
    TARGET_FILE_NAME,
    bundle_target_path,
    unpack_bundle,
)
from modelfleet.kernel.errors import (
    InvalidRequestError,
    ModelfleetError,
    ModelNotFoundError,
    ResourceExhaustedError,
    Status,
    VerificationError,
    did_you_mean,
)
from modelfleet.kernel.identity import (
    EnrollToken,
    cert_fingerprint,
    certificate_common_name,
    load_certificate,
    token_secret_hash,
)
from modelfleet.kernel.jobs import JobRun, JobSpec
from modelfleet.kernel.reports import AgentReport
from modelfleet.protos import fleet_pb2

if TYPE_CHECKING:
    from modelfleet.hub.telemetry import (
        FeatureDrift,
        WindowStats,
    )  # DuckDB loads with the store, not with this module

if TYPE_CHECKING:
    from modelfleet.hub.ports import BlobStorePort, RegistryPort, TelemetryStorePort

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishResult:
    version: VersionRow
    staged_payload: bytes = b""
    targets_keyid: str = ""
    base_targets: bytes = b""


@dataclass(frozen=True)
class AgentStatus:
    """One agent as the fleet listing shows it."""

    agent: AgentRow
    desired: list[Desired]
    presence: str  # online or offline: from MQTT presence, else from when it was last seen
    # What the agent reports it uses; before its first report, what enrollment issued.
    cert_expires_at: float
    # Per desired model, the deployment (or rollout assignment) that decides its version.
    origins: dict[str, DeploymentRow] = field(default_factory=dict)


@dataclass(frozen=True)
class HubPaths:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "registry.db"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def metadata(self) -> Path:
        return self.root / "tuf"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def ca(self) -> Path:
        return self.root / "ca"

    @property
    def admin(self) -> Path:
        return self.root / "admin"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def server_tls(self) -> Path:
        return self.root / "tls"


def expiry_policy(cfg: HubConfig) -> ExpiryPolicy:
    return ExpiryPolicy(
        root=cfg.root_expiry_s,
        targets=cfg.targets_expiry_s,
        snapshot=cfg.snapshot_expiry_s,
        timestamp=cfg.timestamp_expiry_s,
    )


def open_tuf(paths: HubPaths, cfg: HubConfig, clock: Callable[[], float]) -> TufRepository:
    """Open the TUF repository; on first start create it (and online keys unless some exist)."""
    policy = expiry_policy(cfg)
    if (paths.metadata / "root.json").exists():
        return TufRepository.open(paths.metadata, paths.keys, clock=clock, expiry=policy)
    if not paths.keys.exists() or not any(paths.keys.iterdir()):
        # Embedded default: all four keys online. `modelfleet-hub keys init --offline DIR`
        # before the first start keeps root and targets off the hub.
        init_keys(paths.keys)
        log.warning(
            "created TUF keys with root and targets ONLINE in %s; for production, run "
            "`modelfleet-hub keys init --offline DIR` before the first start",
            paths.keys,
        )
    return TufRepository.create(paths.metadata, paths.keys, clock=clock, expiry=policy)


class HubRunningError(ModelfleetError):
    """Another process serves this data directory (or an offline command meets a live hub)."""

    status = Status.FAILED_PRECONDITION
    reason = "hub_running"


LOCK_FILE = "hub.lock"
# registry meta key: "<version>:<sha256>" of the newest signed targets this hub served.
TARGETS_HIGH_WATER = "tuf_targets_high_water"


def lock_data_dir(root: Path, doing: str) -> int:
    """Take ``root/hub.lock`` exclusively; return the descriptor (closing it releases the lock).

    The hub holds it while it serves, so a second hub on the same data refuses to start, and
    offline commands that rewrite what a running hub keeps in memory (key rotation) refuse to
    run next to one. The kernel drops the lock when the process dies, so nothing goes stale.
    """
    root.mkdir(parents=True, exist_ok=True)
    fd = try_lock(root / LOCK_FILE, 0o600)
    if fd is None:
        raise HubRunningError(
            f"cannot {doing}: a hub is running on {root} ({root / LOCK_FILE} is held); "
            f"stop it first"
        )
    return fd


class AgentNotFoundError(ModelfleetError):
    status = Status.NOT_FOUND
    reason = "agent_not_found"


class HubCore:
    def __init__(self, cfg: HubConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.paths = HubPaths(Path(cfg.data))
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.paths.root.chmod(0o700)
        self.paths.uploads.mkdir(exist_ok=True)
        remove_stale_staging(self.paths.uploads)
        # Typed as the ports (hub/ports.py): the core uses nothing adapter-specific.
        self.registry: RegistryPort = Registry(self.paths.db, clock=clock)
        self.blobs: BlobStorePort = BlobStore(self.paths.blobs)
        self.ca = CertificateAuthority.load_or_create(self.paths.ca)
        from modelfleet.hub.crl import CrlPublisher

        # The broker's CRL, where `mqtt-config` put the broker (docs/mqtt.md); nothing without.
        self.crl = CrlPublisher(
            self.ca, self.registry, self.paths.root / "mqtt", cfg.crl_lifetime_s
        )
        self.tuf = open_tuf(self.paths, cfg, clock)
        self.check_targets_high_water()
        # A crash between committing signed targets and marking the rows leaves rows unsigned.
        self.mark_signed_targets()
        self.check_registry_against_targets()
        # A data directory `modelfleet-hub restore` just wrote: TUF versions move up once.
        finish_restore(self)
        self.changed = asyncio.Condition()
        # Set at shutdown: watch streams never end on their own, so they end here instead of
        # holding the drain for its whole timeout (agents reconnect to the next hub).
        self.closing = False
        from modelfleet.hub.telemetry import TELEMETRY_FILE, TelemetryIngestor, TelemetryStore

        # Fleet telemetry (DuckDB, docs/telemetry.md): ingested through telemetry_ingest by the
        # gRPC servicer and the MQTT bridge; window() queries serve rollouts and `metrics`.
        self.telemetry: TelemetryStorePort = TelemetryStore(
            self.paths.root / TELEMETRY_FILE, retention_s=cfg.telemetry_retention_s, clock=clock
        )
        self.telemetry_ingest = TelemetryIngestor(self.telemetry)
        from modelfleet.hub.rollout_manager import RolloutManager

        # Durable: rollouts in flight when the hub stopped continue from their saved state.
        self.rollouts = RolloutManager(self, clock=clock)
        self.jobs = Jobs(self.registry, self.notify_changed)
        self.deployments = Deployments(
            self.registry, self.notify_changed, self.rollouts.active, clock=clock
        )
        from modelfleet.hub.experiments import Experiments

        # Durable: running experiments are rows; their duration timer is a saved end time.
        self.experiments = Experiments(
            self.registry, self.notify_changed, self.rollouts.active, self.telemetry, clock=clock
        )
        from modelfleet.hub.capture import CAPTURE_DIR, CaptureStore
        from modelfleet.hub.outcomes import OUTCOMES_FILE, OutcomeService, OutcomeStore

        # Late labels joined with captured predictions: accuracy for `outcomes show`, the
        # accuracy_drop alert and rollouts' accuracy gates.
        self.outcomes = OutcomeService(
            OutcomeStore(self.paths.root / OUTCOMES_FILE, clock=clock),
            CaptureStore(self.paths.root / CAPTURE_DIR),
        )
        self.experiments.outcomes = self.outcomes
        from modelfleet.hub.audit import AUDIT_FILE, AuditStore
        from modelfleet.hub.governance import Admins

        # Named admin identities and their roles (the interceptor checks them on every call).
        self.admins = Admins(self.registry, clock=clock)

        # Who called the admin services, and how it ended (hub/audit_edge.py writes it).
        self.audit = AuditStore(
            self.paths.root / AUDIT_FILE, retention_days=cfg.audit_retention_days, clock=clock
        )
        # Set once the servers are bound: what tokens and enrollments hand out.
        self.advertise = cfg.listen
        self.advertise_enroll = cfg.enroll_address()

    # -- publishing -----------------------------------------------------------------------------

    def new_upload(self) -> Path:
        fd, path = tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=self.paths.uploads)
        # Only the name is wanted (Publish opens it again): an open descriptor would outlive
        # the upload, held on the blob it becomes or on a refused upload's deleted bytes.
        os.close(fd)
        return Path(path)

    def check_publish_header(self, header: Mapping[str, Any]) -> None:
        """Refuse a header before any of its bytes are taken: name, version, notes, size."""
        name = header["name"]
        if not NAME_RE.match(name):
            raise InvalidRequestError(f"invalid model name {name!r}: use {NAME_RULE}")
        check_version(int(header["version"]), name)
        check_notes(str(header.get("notes", "")))
        self.check_upload_size(int(header.get("size") or 0))

    def verify_upload(self, header: Mapping[str, Any], archive: Path) -> dict[str, Any]:
        """Check an uploaded archive (hash, size, a bundle the agent would accept) and move it
        into the blob store. Thread-safe: touches no registry state."""
        self.check_publish_header(header)
        name, version = header["name"], int(header["version"])
        digest, size = _sha256(archive)
        if header.get("size") and size != int(header["size"]):
            raise InvalidRequestError(
                f"upload is {size} bytes, the header announced {header['size']}"
            )
        if header.get("sha256") and digest != header["sha256"]:
            raise InvalidRequestError("upload sha256 does not match the header's")
        unpack_dir = Path(tempfile.mkdtemp(prefix="verify-", dir=self.paths.uploads))
        try:
            bundle = unpack_bundle(archive, unpack_dir, expect=(name, version))
            manifest = bundle.manifest.to_json()
        finally:
            shutil.rmtree(unpack_dir, ignore_errors=True)
        self.blobs.put_file(archive, digest)
        return {"sha256": digest, "size": size, "manifest": manifest}

    def register_upload(
        self, header: Mapping[str, Any], verified: Mapping[str, Any]
    ) -> PublishResult:
        """Record and sign a verified upload (on the event loop: registry and TUF writes)."""
        name, version = header["name"], int(header["version"])
        self.registry.check_new_version(name, version)
        digest, size, manifest = verified["sha256"], verified["size"], verified["manifest"]
        path = bundle_target_path(name, version)
        custom = {"name": name, "version": version, "manifest_sha256": manifest["model"]["sha256"]}
        staged, keyid, base, signed = b"", "", b"", True
        try:
            self.tuf.add_target(path, size, digest, custom)
        except TargetsKeyRequiredError:
            staged = self.tuf.stage_target(path, size, digest, custom)
            base = self.tuf.published_targets_bytes()
            keyid, signed = self.tuf.targets_keyid(), False
        row = self.registry.add_version(
            name=name,
            version=version,
            sha256=digest,
            size=size,
            notes=str(header.get("notes", "")),
            target_path=path,
            signed=signed,
            manifest=manifest,
        )
        self.note_targets_version()
        log.info(
            "published %s v%d (%d bytes, sha256 %s, %s)",
            name,
            version,
            size,
            digest[:12],
            "signed" if signed else "awaiting targets signature",
        )
        return PublishResult(row, staged, keyid, base)

    def staged_for_signing(self, name: str, version: int) -> PublishResult:
        """Stage exactly ``version`` on the published targets for the offline targets key.

        Each request stages afresh (never on top of an earlier staging), so what the key
        holder is asked to sign is the published targets plus this one version.
        """
        row = self.registry.get_version(name, version)
        assert row is not None
        if row.signed:
            return PublishResult(row)
        custom = {
            "name": name,
            "version": version,
            "manifest_sha256": self.registry.model_sha256(name, version),
        }
        payload = self.tuf.stage_target(row.target_path, row.size, row.sha256, custom)
        base = self.tuf.published_targets_bytes()
        return PublishResult(row, payload, self.tuf.targets_keyid(), base)

    def commit_targets(
        self, name: str, version: int, keyid: str, signature: str, payload: bytes = b""
    ) -> VersionRow:
        row = self.registry.get_version(name, version)
        assert row is not None
        if row.signed:
            return row
        self.tuf.commit_staged_targets({"keyid": keyid, "sig": signature}, payload or None)
        self.note_targets_version()
        self.mark_signed_targets()
        out = self.registry.get_version(name, version)
        assert out is not None
        if not out.signed:
            raise VerificationError(
                f"the signed targets do not list {name} v{version} with its sha256: sign it "
                f"with `modelfleet-hub sign {name} {version}`"
            )
        return out

    def mark_signed_targets(self) -> None:
        """Mark signed every registry version the signed targets list with its exact hash."""
        signed = self.tuf.targets()
        for v in self.registry.all_versions():
            target = signed.get(v.target_path)
            if (
                not v.signed
                and target is not None
                and target.hashes.get("sha256") == v.sha256
                and target.length == v.size
            ):
                self.registry.mark_signed(v.name, v.version)
                log.info("targets signed: %s v%d", v.name, v.version)

    def check_targets_high_water(self) -> None:
        """Refuse targets older than the newest this hub served, or another file of that version.

        The metadata directory alone cannot tell a rollback (snapshot pointed back at an older,
        validly signed targets) from the truth after a restart; the registry remembers.
        """
        versions = self.tuf.versions()
        current = versions["targets"]
        digest = hashlib.sha256(self.tuf.published_targets_bytes()).hexdigest()
        seen = self.registry.get_meta(TARGETS_HIGH_WATER)
        if seen is not None:
            version, _, seen_digest = seen.partition(":")
            if current < int(version):
                raise RepositoryIntegrityError(
                    f"the signed targets are v{current}, but this hub already served targets "
                    f"v{version}: a rollback of HUB_DATA/tuf (or a restored old backup). "
                    "Restore the newest metadata; see docs/operations.md"
                )
            if current == int(version) and digest != seen_digest:
                raise RepositoryIntegrityError(
                    f"targets v{current} on disk is not the targets v{current} this hub served "
                    f"(sha256 {digest[:16]}, served {seen_digest[:16]}): two different files "
                    "carry one version (a fork)"
                )
        self.note_targets_version()

    def note_targets_version(self) -> None:
        """Record the targets now published as the newest this hub has served."""
        versions = self.tuf.versions()
        digest = hashlib.sha256(self.tuf.published_targets_bytes()).hexdigest()
        value = f"{versions['targets']}:{digest}"
        if self.registry.get_meta(TARGETS_HIGH_WATER) != value:
            self.registry.set_meta(TARGETS_HIGH_WATER, value)

    def check_registry_against_targets(self) -> None:
        """Refuse to run when a version the registry holds as signed is signed with other bytes.

        Guards the other direction of immutability: metadata that verifies (the targets key
        signed it) but points a published version at other bytes than were published.
        """
        signed = self.tuf.targets()
        problems = []
        for v in self.registry.all_versions():
            if not v.signed:
                continue
            target = signed.get(v.target_path)
            if target is None:
                # The database claims more than the signatures do (a restored metadata backup,
                # or a tampered database): believe the signatures, agents will too.
                log.error(
                    "%s v%d is marked signed but the signed targets do not list it: "
                    "marked unsigned; publish it again",
                    v.name,
                    v.version,
                )
                self.registry.mark_signed(v.name, v.version, signed=False)
            elif target.hashes.get("sha256") != v.sha256 or target.length != v.size:
                problems.append(
                    f"{v.name} v{v.version} was published as sha256 {v.sha256[:16]} "
                    f"({v.size} bytes), the signed targets say sha256 "
                    f"{target.hashes.get('sha256', '?')[:16]} ({target.length} bytes)"
                )
        if problems:
            raise RepositoryIntegrityError(
                "the signed targets disagree with the registry: "
                + "; ".join(problems)
                + ". Restore HUB_DATA/metadata from a backup, or find out who signed this"
            )

    # -- fleet ----------------------------------------------------------------------------------

    def create_token(self, labels: Mapping[str, str], ttl_s: float) -> EnrollToken:
        if ttl_s <= 0:
            raise InvalidRequestError("token ttl must be positive")
        check_labels(labels)
        token = EnrollToken.create(
            self.advertise_enroll, self.ca.fingerprint, ttl_s, now=self.clock()
        )
        self.registry.add_token(
            token.token_id, token_secret_hash(token.secret), labels, token.expires_at
        )
        return token

    def enroll(
        self, token_id: str, secret: str, csr_pem: bytes, hostname: str
    ) -> tuple[str, bytes, dict[str, str]]:
        # Readable ids ("edge-berlin-1-3fa2c1") that are also valid identity names.
        host = re.sub(r"[^a-z0-9.-]+", "-", hostname.lower()).strip("-.")[:40] or "agent"
        agent_id = f"{host}-{secrets.token_hex(3)}"
        labels = self.registry.consume_token(token_id, token_secret_hash(secret), agent_id)
        cert = self.ca.sign_csr(csr_pem, f"agent:{agent_id}", self._agent_cert_days())
        self.registry.add_agent(
            agent_id,
            hostname,
            labels,
            cert_fingerprint(cert),
            _not_after(cert),
            serial=_serial(cert),
        )
        log.info("enrolled agent %s (%s) with labels %s", agent_id, hostname, labels)
        return agent_id, cert, labels

    def renew_certificate(
        self, agent_id: str, csr_pem: bytes, presented_pem: bytes, signature: bytes | None = None
    ) -> bytes:
        """A new certificate for an enrolled, not revoked agent: same agent id (labels, desired
        state, revocation all carry over), the CSR's key (new, generated on the node), a full
        lifetime from now.

        ``presented_pem`` is the certificate the agent asks with: the peer certificate over
        gRPC (the handshake proved the key: ``signature`` None); through MQTT, where the
        broker ends TLS, the certificate in the request with ``signature`` over the CSR by
        its key. Only the agent's confirmed certificate or the one the last renewal issued may
        renew (the latter then becomes the confirmed one): once the agent has renewed, a copy
        of its old key stops working at that certificate's expiry, and if a copy renews
        first, the real agent's renewals fail loudly instead.
        """
        agent = self.authorize_agent(agent_id)
        presented = self._presented_certificate(agent_id, presented_pem, csr_pem, signature)
        if presented not in (agent.cert_fingerprint, agent.cert_pending):
            log.warning(
                "agent %s asked for a renewal with a certificate that an earlier "
                "renewal replaced (%s...); refused",
                agent_id,
                presented[:23],
            )
            raise PermissionDeniedError(
                f"agent {agent_id}: this certificate was replaced by an earlier renewal and "
                f"cannot renew (is a copy of the agent's key in use elsewhere? revoke the agent "
                f"and enroll the node again)"
            )
        cert = self.ca.sign_csr(csr_pem, f"agent:{agent_id}", self._agent_cert_days())
        self.registry.renewed(
            agent_id, presented, cert_fingerprint(cert), _serial(cert), _not_after(cert)
        )
        log.info(
            "renewed the certificate of agent %s (valid until %s)",
            agent_id,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_not_after(cert))),
        )
        return cert

    def _presented_certificate(
        self, agent_id: str, cert_pem: bytes, csr_pem: bytes, signature: bytes | None
    ) -> str:
        """Fingerprint of the certificate a renewal was asked with, after checking it."""
        if not cert_pem:
            raise InvalidRequestError("a renewal must come with the certificate in use")
        cert = load_certificate(cert_pem)
        if certificate_common_name(cert) != f"agent:{agent_id}":
            raise PermissionDeniedError(f"the certificate presented is not agent {agent_id}'s")
        try:
            cert.verify_directly_issued_by(self.ca.certificate)
        except Exception:
            raise PermissionDeniedError(
                "the certificate presented is not from this hub's CA"
            ) from None
        if cert.not_valid_after_utc.timestamp() <= time.time():
            raise PermissionDeniedError("the certificate presented has expired")
        if signature is not None:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import ec

            key = cert.public_key()
            try:
                if not isinstance(key, ec.EllipticCurvePublicKey):
                    raise TypeError(type(key).__name__)
                key.verify(signature, csr_pem, ec.ECDSA(hashes.SHA256()))
            except Exception:
                raise PermissionDeniedError(
                    "the renewal request is not signed by the key of the certificate presented"
                ) from None
        return cert_fingerprint(cert)

    def _agent_cert_days(self) -> float:
        return self.cfg.agent_cert_lifetime_s / 86400

    def authorize_agent(self, agent_id: str) -> AgentRow:
        agent = self.registry.agent(agent_id)
        if agent.status != "active":
            raise PermissionDeniedError(f"agent {agent_id} is {agent.status}")
        return agent

    async def ingest_telemetry(
        self,
        agent_id: str,
        reports: Sequence[fleet_pb2.TelemetryReport],
        job_runs: Sequence[JobRun] = (),
    ) -> list[int]:
        """Store an agent's telemetry batch (both transports); return the seqs to acknowledge.

        ``job_runs`` are the runs riding in those reports, converted by the edge. They go to the
        registry first: both stores are idempotent (job runs by run id, reports by seq), so a
        batch that fails halfway is simply resent.
        """
        # Rare and small: on the loop, like the rest of the registry.
        self.jobs.record_runs(agent_id, list(job_runs))
        return await self.telemetry_ingest.ingest(agent_id, reports)

    def desired(self, agent: AgentRow) -> tuple[int, list[Desired]]:
        return self.registry.revision(), self.registry.desired_for(agent.labels, agent.agent_id)

    def desired_state(self, agent: AgentRow) -> tuple[int, list[Desired], list[JobSpec]]:
        """What an agent is sent: revision, models and the specs of the jobs it runs."""
        revision, desired = self.desired(agent)
        return revision, desired, self.registry.jobs_for(agent.labels)

    def watch(self, agent_id: str) -> tuple[int, list[Desired], list[JobSpec]]:
        """One look of an agent's watch stream: refused once revoked, and counts as seen."""
        agent = self.authorize_agent(agent_id)
        self.registry.touch(agent_id)
        return self.desired_state(agent)

    def agents(self) -> list[AgentRow]:
        return self.registry.agents()

    def list_agents(self) -> list[AgentStatus]:
        out = []
        for a in self.registry.agents():
            _, desired = self.desired(a)
            online = time.time() - a.last_seen < self.cfg.offline_after_s
            decided = self.registry.decided_for(a.labels, a.agent_id)
            out.append(
                AgentStatus(
                    agent=a,
                    desired=desired,
                    presence=a.presence or ("online" if online else "offline"),
                    cert_expires_at=a.report.cert_expires_at or a.cert_expires_at,
                    origins={d.name: decided[d.name] for d in desired if d.name in decided},
                )
            )
        return out

    def set_presence(self, agent_id: str, online: bool) -> None:
        """MQTT presence (the agent's online message, or its last will)."""
        self.registry.set_presence(agent_id, online)

    def models(self) -> list[dict[str, Any]]:
        return self.registry.models()

    def versions(self, name: str) -> list[VersionRow]:
        return self.registry.versions(name)

    async def metrics(
        self, model: str, version: int, agent: str, since_s: float
    ) -> tuple[list[WindowStats], float]:
        """Per-version request statistics over the last ``since_s`` seconds (0: the last 600),
        of one agent (an id, or a hostname, which may name several) or of all; with the window.
        """
        if not model:
            raise InvalidRequestError("metrics needs a model name")
        window = since_s or 600.0
        if window <= 0:
            raise InvalidRequestError("the window (since) must be positive")
        # An unknown model is an error (with the close names), not an empty window.
        self.registry.versions(model)
        if version:
            self.registry.get_version(model, version)
        agents = None
        if agent:
            rows = self.registry.agents()
            agents = [a.agent_id for a in rows if a.agent_id == agent] or [
                a.agent_id for a in rows if a.hostname == agent
            ]
            if not agents:
                names = [a.agent_id for a in rows] + [a.hostname for a in rows]
                raise InvalidRequestError(
                    f"no agent with id or hostname {agent!r}{did_you_mean(agent, names)}"
                )
        now = time.time()
        stats = await self.telemetry_ingest.query(
            self.telemetry.window, model, version or None, agents, now - window, now
        )
        return list(stats), window

    def _agents_named(self, agent: str) -> list[str]:
        rows = self.registry.agents()
        agents = [a.agent_id for a in rows if a.agent_id == agent] or [
            a.agent_id for a in rows if a.hostname == agent
        ]
        if not agents:
            names = [a.agent_id for a in rows] + [a.hostname for a in rows]
            raise InvalidRequestError(
                f"no agent with id or hostname {agent!r}{did_you_mean(agent, names)}"
            )
        return agents

    async def drift(
        self,
        model: str,
        version: int,
        agent: str,
        selector: Mapping[str, str],
        since_s: float,
    ) -> tuple[list[FeatureDrift], float]:
        """Drift per feature over the drift windows reported in the last ``since_s`` seconds
        (0: one hour): fleet-wide, then per agent (hub.telemetry.TelemetryStore.drift_window).
        ``agent`` (an id or hostname) or ``selector`` narrow the agents; not both."""
        if not model:
            raise InvalidRequestError("drift needs a model name")
        if agent and selector:
            raise InvalidRequestError("give --agent or --selector, not both")
        window = since_s or 3600.0
        if window <= 0:
            raise InvalidRequestError("the window (since) must be positive")
        self.registry.versions(model)
        if version:
            self.registry.get_version(model, version)
        agents: list[str] | None = None
        if agent:
            agents = self._agents_named(agent)
        elif selector:
            check_labels(dict(selector))
            agents = [
                a.agent_id for a in self.registry.agents() if selector_matches(selector, a.labels)
            ]
            if not agents:
                raise InvalidRequestError(
                    f"no agent matches the selector "
                    f"{','.join(f'{k}={v}' for k, v in sorted(selector.items()))}"
                )
        now = time.time()
        stats = await self.telemetry_ingest.query(
            self.telemetry.drift_window, model, version or None, agents, now - window, now
        )
        return list(stats), window

    async def set_stage(
        self, name: str, version: int, stage: str, force: bool = False
    ) -> VersionRow:
        """Set a version's stage; retiring one that agents still want, or marking production
        one that the fleet does not desire (hub.deployments: the production rule), needs
        ``force``."""
        if stage == "production" and not force:
            row = self.registry.get_version(name, version)
            if row is not None and row.stage != "production":
                self.deployments.check_production(name, version)
        if stage == "retired" and not force:
            wanting = [
                a.hostname or a.agent_id
                for a in self.registry.agents()
                if a.status == "active"
                and any(
                    d.name == name and version in (d.version, d.prepare_version)
                    for d in self.registry.desired_for(a.labels, a.agent_id)
                )
            ]
            if wanting:
                shown = ", ".join(sorted(wanting)[:10]) + (" ..." if len(wanting) > 10 else "")
                raise FailedPreconditionError(
                    f"{name} v{version} is still the desired version of {len(wanting)} agent(s) "
                    f"({shown}): deploy or roll out a newer version first, or pass --force to "
                    "retire it now (those agents then follow the deployment before it, or drop "
                    "the model)"
                )
        row = self.registry.set_stage(name, version, stage)
        if stage == "retired":
            async with self.changed:
                self.changed.notify_all()
        return row

    async def notify_changed(self) -> None:
        """Wake every watch stream and the MQTT bridge: desired state may have changed."""
        async with self.changed:
            self.changed.notify_all()

    async def deploy(
        self, name: str, version: int, selector: Mapping[str, str], actor: str = ""
    ) -> tuple[list[str], int]:
        """Deploy for callers inside the hub: no dry run, and a selector matching no agent is
        accepted. The admin API's `deploy` goes through ``self.deployments`` (its checks)."""
        outcome = await self.deployments.deploy(
            name, version, selector, actor=actor, allow_empty=True
        )
        return outcome.matched, outcome.revision

    async def wait_changed(self, timeout: float) -> None:
        """Wait until desired state may have changed (``changed`` is notified), at most
        ``timeout`` seconds; at once when the hub is stopping (close_watches ends every wait).

        The wait runs in the caller's task under asyncio.timeout, so the condition's lock is
        held again however it ends: wait_for() around Condition.wait() can return (cancelled
        twice: an agent hanging up as the hub stops) before the inner task has the lock back,
        and leaving ``async with`` then releases a lock the caller does not hold ("RuntimeError:
        Lock is not acquired"), or one another task holds.
        """
        async with self.changed:
            if self.closing:
                return
            try:
                async with asyncio.timeout(timeout):
                    await self.changed.wait()
            except TimeoutError:
                pass  # nothing changed: the caller re-checks anyway

    async def close_watches(self) -> None:
        """End every WatchDesired stream (the hub is stopping)."""
        self.closing = True
        async with self.changed:
            self.changed.notify_all()

    async def revoke(self, agent_id: str) -> None:
        self.require_agent(agent_id)
        self.registry.revoke(agent_id)
        log.warning("agent %s revoked", agent_id)
        try:
            # The broker refuses the agent's TLS handshakes from its reload on.
            self.crl.publish()
        except Exception:
            log.exception(
                "writing the broker's CRL failed; the hub still refuses agent %s, and "
                "tries the CRL again at its next refresh",
                agent_id,
            )
            self.crl.due = 0.0
        async with self.changed:
            self.changed.notify_all()

    def require_agent(self, agent_id: str) -> None:
        """Raise AgentNotFoundError for an unknown id; a hostname given instead names its ids."""
        rows = self.registry.agents()
        if any(a.agent_id == agent_id for a in rows):
            return
        named = [a for a in rows if a.hostname == agent_id]
        if len(named) == 1:
            raise AgentNotFoundError(
                f"no agent with id {agent_id!r}; {agent_id!r} is the hostname of agent "
                f"{named[0].agent_id}: use that id"
            )
        if named:
            ids = ", ".join(f"{a.agent_id} ({a.status})" for a in named)
            raise AgentNotFoundError(
                f"no agent with id {agent_id!r}; {agent_id!r} is the hostname of {len(named)} "
                f"agents: {ids}: use the id of the one you mean"
            )
        known = [a.agent_id for a in rows]
        raise AgentNotFoundError(
            f"no agent with id {agent_id!r}{did_you_mean(agent_id, known)}; "
            "`modelfleet-hub agents ls` lists the agents"
        )

    def report(self, agent_id: str, report: AgentReport) -> None:
        """An (authorized) agent's report, from either transport; it counts as seen."""
        self.registry.touch(agent_id, report)

    # -- distribution ---------------------------------------------------------------------------

    def metadata(self, filename: str) -> bytes:
        return self.tuf.read(filename)

    def target_chunks(self, path: str, offset: int) -> tuple[int, Iterator[bytes]]:
        """``<name>/<version>/<sha256>.bundle.tar`` (consistent snapshot naming)."""
        leaf = path.rsplit("/", 1)[-1]
        digest = leaf.split(".", 1)[0]
        if not leaf.endswith(f".{TARGET_FILE_NAME}") or len(digest) != 64:
            raise ModelNotFoundError(f"no such target {path!r}")
        size = self.blobs.size(digest)
        if offset < 0 or offset > size:
            raise InvalidRequestError(f"offset {offset} outside of {path} ({size} bytes)")
        return size, self.blobs.read(digest, offset)

    def admit_upload(self, header: Mapping[str, Any]) -> None:
        """Refuse nonsense, a duplicate or a stale version before an upload's bytes are taken."""
        self.check_publish_header(header)
        self.registry.check_new_version(header["name"], int(header["version"]))
        self.check_version_unknown_to_agents(header["name"], int(header["version"]))

    def check_version_unknown_to_agents(self, name: str, version: int) -> None:
        """Refuse a version number that agents report but the registry has no record of.

        That happens after a restore from a backup: versions published after it are lost with
        the hub, but agents still hold them. Agents cache bundles by name and version, so the
        same number with other bytes would have them serve the lost bundle.
        """
        holders, highest = [], 0
        for a in self.registry.agents():
            for m in a.report.models:
                if m.name != name:
                    continue
                seen = (m.active_version, m.previous_version, m.loading_version, m.desired_version)
                highest = max(highest, *seen)
                if version in seen:
                    holders.append(a.hostname or a.agent_id)
        if holders:
            shown = ", ".join(sorted(holders)[:5]) + (" ..." if len(holders) > 5 else "")
            raise FailedPreconditionError(
                f"{name} v{version} is not in this hub's registry, but agent(s) {shown} report "
                f"a {name} v{version} (published after the backup this hub was restored from?): "
                f"agents keep bundles by version, so that number cannot carry other bytes; "
                f"publish as v{highest + 1} or later (--version {highest + 1})"
            )

    def backup(self) -> AsyncIterator[BackupFile | bytes | BackupSummary]:
        """A consistent copy of the hub's state, streamed (hub/backup.py)."""
        return backup_stream(self)

    def check_upload_size(self, size: int) -> None:
        if size > self.cfg.max_bundle_bytes:
            raise ResourceExhaustedError(
                f"bundle of {size} bytes exceeds max_bundle_bytes {self.cfg.max_bundle_bytes}"
            )

    def server_hostnames(self) -> list[str]:
        names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
        for addr in (
            self.cfg.listen,
            self.cfg.enroll_address(),
            self.cfg.advertise,
            self.cfg.advertise_enroll,
        ):
            if addr:
                names.append(addr.rpartition(":")[0].strip("[]"))
        names += [h.strip() for h in self.cfg.hostnames.split(",") if h.strip()]
        return [n for n in dict.fromkeys(names) if n and n not in ("0.0.0.0", "::")]

    def refresh_signatures(self) -> bool:
        wrote = self.tuf.refresh_online()
        if wrote:
            self.note_targets_version()  # an online targets key re-signs targets too
        return wrote


def _serial(cert_pem: bytes) -> int:
    return load_certificate(cert_pem).serial_number


def _not_after(cert_pem: bytes) -> float:
    return load_certificate(cert_pem).not_valid_after_utc.timestamp()


def _sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
