"""Wires the hub together for ``modelfleet-hub serve`` and runs it until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import grpc

from modelfleet.hub.alert_manager import ALERTS_FILE, AlertManager, AlertSettings, AlertStore
from modelfleet.hub.alerts import AccuracySource, DriftSource
from modelfleet.hub.alerts_server import AlertsServicer
from modelfleet.hub.audit_edge import AuditInterceptor
from modelfleet.hub.ca import DEFAULT_CLIENT_DAYS
from modelfleet.hub.capture import CAPTURE_DIR, CaptureService, CaptureStore
from modelfleet.hub.capture_server import CaptureServicer
from modelfleet.hub.config import RELOADABLE, HubConfig, reload_hub_config
from modelfleet.hub.core import HubCore, lock_data_dir
from modelfleet.hub.outcomes_server import OutcomesServicer
from modelfleet.hub.server import AdminServicer, FleetServicer
from modelfleet.hub.signing import RepositoryIntegrityError
from modelfleet.kernel import tracing
from modelfleet.kernel.atomic import atomic_write_json
from modelfleet.kernel.commandline import package_version
from modelfleet.kernel.errors import ListenError
from modelfleet.kernel.grpc_options import server_options
from modelfleet.kernel.identity import (
    generate_key,
    load_certificate,
    renewal_time,
    write_pem,
    write_private_key,
)
from modelfleet.kernel.listen import check_listen
from modelfleet.kernel.logs import reload_logged
from modelfleet.kernel.sdnotify import Notifier
from modelfleet.kernel.tracing import TracingSettings
from modelfleet.protos import fleet_pb2_grpc as pb_grpc

log = logging.getLogger("modelfleet.hub")


class PeerGoneAtShutdown(logging.Filter):
    """While the hub drains, a watch stream whose agent hung up at the same moment cannot send
    its final status; gRPC logs that as an error with a traceback although nothing is lost
    (the agent reconnects to the hub that comes next). Installed only once shutdown begins."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ExecuteBatchError" not in record.getMessage()


def tls_material(core: HubCore) -> tuple[bytes, bytes, bytes]:
    """(server key, server chain [leaf + CA], CA) for this start's hostnames."""
    from cryptography.hazmat.primitives import serialization

    tls = core.paths.server_tls
    tls.mkdir(mode=0o700, exist_ok=True)
    key = generate_key()
    write_private_key(tls / "hub.key", key)
    cert = core.ca.issue_server_cert(key.public_key(), core.server_hostnames())
    write_pem(tls / "hub.crt", cert)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # The CA rides along in the chain so a new agent can fetch it and pin its fingerprint.
    return key_pem, cert + core.ca.cert_pem, core.ca.cert_pem


def ensure_admin_identity(core: HubCore, now: float | None = None) -> None:
    """Issue the admin identity if there is none; renew its certificate (same key) when due.

    Called at start and with every metadata refresh, so a hub that runs for a year keeps a
    working CLI without a restart.
    """
    cert_path = core.paths.admin / "admin.crt"
    if not cert_path.exists():
        core.ca.issue_admin(core.paths.admin)
        log.info("admin identity written to %s", core.paths.admin)
        return
    cert = load_certificate(cert_path.read_bytes())
    if (time.time() if now is None else now) >= renewal_time(cert):
        core.ca.renew_admin(core.paths.admin, DEFAULT_CLIENT_DAYS)
        until = cert.not_valid_after_utc.isoformat(timespec="seconds")
        log.info(
            "renewed the admin certificate in %s (it was valid until %s)", core.paths.admin, until
        )


def start_capture(core: HubCore, loop: asyncio.AbstractEventLoop | None = None) -> CaptureService:
    """Inference capture: settings in the registry, shipped files under DATA/capture."""
    store = CaptureStore(
        core.paths.root / CAPTURE_DIR, agent_quota_bytes=core.cfg.capture_agent_quota_bytes
    )
    service = CaptureService(core.registry, store)
    service.loop = loop
    return service


def start_alerts(
    core: HubCore, cfg: HubConfig, capture: CaptureService | None = None
) -> AlertManager:
    """The alert evaluator and webhook sender over ``DATA/alerts.sqlite``; its settings are
    read from ``cfg`` every round, so a SIGHUP changes them."""

    def settings() -> AlertSettings:
        return AlertSettings(
            interval_s=cfg.alert_interval_s,
            max_attempts=cfg.webhook_max_attempts,
            backoff_s=cfg.webhook_backoff_s,
            backoff_max_s=cfg.webhook_backoff_max_s,
            timeout_s=cfg.webhook_timeout_s,
        )

    store = AlertStore(core.paths.root / ALERTS_FILE)
    manager = AlertManager(
        store,
        core.telemetry,
        settings,
        capture_locator=capture.store.locate if capture is not None else None,
    )
    # Agents report drift windows in their telemetry: the drift rules evaluate for real.
    manager.register_source("drift_psi", DriftSource(core.telemetry))
    # Late labels joined with captured predictions (hub.outcomes).
    manager.register_source("accuracy_drop", AccuracySource(core.outcomes))
    return manager


def fleet_for_alerts(
    core: HubCore, with_agents: bool
) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """Model names, and (agent id, labels) if a rule selects agents, for one evaluation round."""
    models = [m["name"] for m in core.registry.models()]
    if not with_agents:
        return models, []
    return models, [(a.agent_id, dict(a.labels)) for a in core.registry.agents()]


def check_ports(cfg: HubConfig) -> None:
    """Every port the hub will listen on can be bound now (kernel/listen.py), or ListenError."""
    check_listen(cfg.listen, "the hub's admin and agent port (listen)", "set another with --listen")
    enroll_fix = (
        "set another with --enroll-listen"
        if cfg.enroll_listen
        else "set one with --enroll-listen (without it the hub takes the port after listen's)"
    )
    check_listen(cfg.enroll_address(), "the enrollment port (enroll_listen)", enroll_fix)
    if cfg.metrics_listen:
        fix = "set another with --metrics-listen"
        check_listen(cfg.metrics_listen, "fleet metrics (metrics_listen)", fix)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials) -> int:
    """Bind ``address``; a port taken since check_ports is a ListenError, not a traceback."""
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if not port:
        raise ListenError(f"cannot listen on {address} (address in use or not local?)")
    return port


def start_tracing(cfg: HubConfig) -> None:
    """OpenTelemetry on when tracing_endpoint is set (the SDK is imported only then)."""
    if not cfg.tracing_endpoint:
        return
    tracing.start(
        TracingSettings(
            cfg.tracing_endpoint,
            cfg.tracing_sample_ratio,
            cfg.tracing_service_name,
            package_version(),
        )
    )
    log.info(
        "tracing: OTLP to %s, sampling %g of operations without a sampled parent",
        cfg.tracing_endpoint,
        cfg.tracing_sample_ratio,
    )


async def serve(cfg: HubConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``); SIGHUP reloads the config.

    Under systemd (``Type=notify``): READY=1 once both ports listen and the TUF metadata is
    fresh, STATUS=, WATCHDOG=1 from this event loop, RELOADING=1/READY=1 around a reload,
    STOPPING=1 when the drain begins.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = Notifier()
    watchdog = loop.create_task(notifier.run_watchdog())
    notifier.status("starting")
    ready = False
    stopping = False
    # Set by a reload, so a changed refresh_interval_s applies now, not after the old one.
    refresh_wakeup = asyncio.Event()

    def status_text() -> str:
        return f"serving on {core.advertise} (enrollment {core.advertise_enroll})"

    def reload() -> None:
        """SIGHUP, on the loop: no request sees a half-applied config."""
        if stopping:
            log.info("SIGHUP while shutting down: ignored")
            return
        if ready:
            notifier.reloading("reloading configuration")

        def applied(changed: list[str]) -> None:
            if "refresh_interval_s" in changed:
                refresh_wakeup.set()

        reload_logged(cfg, reload_hub_config, RELOADABLE, log, applied)
        if ready:
            notifier.ready(status_text())

    loop.add_signal_handler(signal.SIGHUP, reload)

    # Before the data directory, CA or keys are created: a busy port leaves nothing behind.
    check_ports(cfg)
    data_lock = lock_data_dir(Path(cfg.data), "start the hub")
    core = HubCore(cfg)
    ensure_admin_identity(core)
    start_tracing(cfg)
    key_pem, chain_pem, ca_pem = tls_material(core)
    server = grpc.aio.server(
        options=server_options(cfg.max_message_bytes, keepalive=True),
        interceptors=[AuditInterceptor(core.audit, cfg, core.admins)],
    )
    pb_grpc.add_FleetServicer_to_server(FleetServicer(core), server)
    pb_grpc.add_HubAdminServicer_to_server(AdminServicer(core), server)
    capture = start_capture(core, loop)
    pb_grpc.add_HubCaptureServicer_to_server(CaptureServicer(core, capture), server)
    alerts = start_alerts(core, cfg, capture)
    pb_grpc.add_HubAlertsServicer_to_server(AlertsServicer(alerts), server)
    pb_grpc.add_HubOutcomesServicer_to_server(OutcomesServicer(core.outcomes), server)
    mtls = grpc.ssl_server_credentials(
        [(key_pem, chain_pem)], root_certificates=ca_pem, require_client_auth=True
    )
    # Enrollment: the node has no certificate yet; the one-time token authorises it. Every
    # other method checks for a client identity and so refuses callers on this port.
    server_auth_only = grpc.ssl_server_credentials([(key_pem, chain_pem)])
    port = _bind(server, cfg.listen, mtls)
    enroll_port = _bind(server, cfg.enroll_address(), server_auth_only)
    core.advertise = cfg.advertised(port)
    core.advertise_enroll = cfg.advertised_enroll(enroll_port)
    if cfg.metrics_listen:
        from modelfleet.hub.telemetry import serve_metrics

        try:
            serve_metrics(core.telemetry, cfg.metrics_listen)
        except OSError as exc:
            raise ListenError(
                f"cannot serve metrics on {cfg.metrics_listen}: {exc.strerror}"
            ) from None
        log.info("fleet metrics on http://%s/metrics", cfg.metrics_listen)
    await server.start()
    atomic_write_json(
        core.paths.admin / "hub.json",
        {"address": core.advertise, "enroll_address": core.advertise_enroll},
        indent=2,
        mode=0o600,
    )
    core.refresh_signatures()
    try:
        # Revocations recorded while the hub was down, or a CRL close to lapsing: current now.
        core.crl.publish()
    except Exception:
        log.exception("writing the broker's CRL failed; will retry")
    log.info(
        "READY: hub on %s (enrollment %s), data %s", core.advertise, core.advertise_enroll, cfg.data
    )
    ready = True
    notifier.ready(status_text())

    async def refresher() -> None:
        while not stop.is_set():
            refresh_wakeup.clear()
            waiters = {
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(refresh_wakeup.wait()),
            }
            # The interval is read each round, so a reload changes it.
            await asyncio.wait(
                waiters, timeout=cfg.refresh_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
            for w in waiters:
                w.cancel()
            if stop.is_set():
                return
            try:
                if core.refresh_signatures():
                    log.info("re-signed timestamp/snapshot metadata")
            except RepositoryIntegrityError as exc:
                log.error("not re-signing TUF metadata that does not verify: %s", exc)
            except Exception:
                log.exception("refreshing TUF metadata failed; will retry")
            try:
                ensure_admin_identity(core)
            except Exception:
                log.exception("renewing the admin certificate failed; will retry")
            try:
                core.crl.publish(force=False)
            except Exception:
                log.exception("re-issuing the broker's CRL failed; will retry")

    async def flush_seen() -> None:
        from modelfleet.hub.registry import SEEN_FLUSH_S

        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SEEN_FLUSH_S)
            try:
                core.registry.flush_seen()
            except Exception:
                log.exception("writing agents' last-seen times failed; will retry")

    tasks = [loop.create_task(refresher()), loop.create_task(flush_seen())]
    # Rollouts in flight when the hub last stopped continue from their saved state.
    tasks.append(loop.create_task(core.rollouts.run(stop)))
    # Experiments whose --duration passed while the hub was down end on the first tick.
    tasks.append(loop.create_task(core.experiments.run(stop)))
    tasks.append(loop.create_task(core.telemetry_ingest.prune_loop(stop)))
    alerts.hub = core.advertise
    tasks.append(
        loop.create_task(alerts.run(stop, lambda with_agents: fleet_for_alerts(core, with_agents)))
    )
    tasks.append(loop.create_task(alerts.deliver(stop)))
    bridge = None
    if cfg.mqtt:
        from modelfleet.hub.mqtt import MqttBridge

        bridge = MqttBridge(
            core, cfg.mqtt, loop, capture.store, resync_interval_s=cfg.mqtt_resync_interval_s
        )
        bridge.start()
        tasks.append(loop.create_task(bridge.run(stop)))
    try:
        await stop.wait()
    finally:
        stopping = True
        logging.getLogger("grpc._cython.cygrpc").addFilter(PeerGoneAtShutdown())
        log.info("shutting down: draining in-flight calls (up to %gs)", cfg.drain_timeout_s)
        notifier.stopping(f"stopping: draining in-flight calls (up to {cfg.drain_timeout_s:g}s)")
        # New calls are refused first, then the watch streams end: they would otherwise hold
        # the drain for its whole timeout, and their agents reconnect with backoff anyway.
        draining = asyncio.ensure_future(server.stop(grace=cfg.drain_timeout_s))
        await asyncio.sleep(0)
        await core.close_watches()
        await draining
        await asyncio.gather(*tasks)
        if bridge is not None:
            bridge.stop()
        alerts.close()
        core.outcomes.close()
        core.audit.close()
        core.telemetry_ingest.close()
        core.registry.close()
        # Last: the drained calls' and final rollout steps' spans go out with the flush.
        tracing.stop()
        os.close(data_lock)
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        log.info("stopped")
