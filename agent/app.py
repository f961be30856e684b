"""Wires the agent together for ``modelfleet-agent serve``/``run`` and runs it as a service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from modelfleet.agent.config import (
    RELOADABLE,
    ServeConfig,
    allowed_providers,
    model_device_ids,
    reload_config,
)
from modelfleet.agent.metrics import AgentMetrics
from modelfleet.agent.repository import (
    UNLOADED_FILE,
    ModelControl,
    RepositoryWatcher,
    UnloadedRecord,
)
from modelfleet.agent.serving.admission import Admission, Limits
from modelfleet.agent.serving.capture import Capture, CaptureLimits, LocalRules
from modelfleet.agent.serving.dataplane import DataPlane
from modelfleet.agent.serving.drift import DriftMonitor
from modelfleet.agent.serving.grpc_server import (
    HealthReporter,
    build_admin_server,
    build_server,
    claim_admin_socket,
)
from modelfleet.agent.serving.security import (
    BearerTokenInterceptor,
    TlsFiles,
    server_credentials,
    server_ssl_context,
)
from modelfleet.agent.serving.shadow import ShadowRunner
from modelfleet.agent.serving.shm import SharedMemoryRegistry
from modelfleet.agent.slots import BatchingConfig, SlotManager
from modelfleet.agent.telemetry import JOURNAL_SLOTS, CounterStore
from modelfleet.agent.workers import SERVING_CELLS_FILE, ServingWorkers
from modelfleet.kernel import tracing
from modelfleet.kernel.errors import InvalidRequestError, ListenError
from modelfleet.kernel.listen import check_listen
from modelfleet.kernel.logs import reload_logged
from modelfleet.kernel.runtime import RuntimeOptions
from modelfleet.kernel.sdnotify import Notifier
from modelfleet.kernel.settings import split_hostport
from modelfleet.kernel.tracing import TracingSettings

if TYPE_CHECKING:
    import ssl

    from modelfleet.agent.fleet.controlplane import ControlPlane
    from modelfleet.agent.serving.http_server import HttpServer

log = logging.getLogger("modelfleet.agent")

# Hubs before agent certificates carried serverAuth issued them for clients only.
_RENEW_FOR_SERVER_AUTH = (
    "this enrolled certificate is for TLS clients only (issued by an older hub); the agent gets "
    "one that also serves TLS at its next certificate renewal, or at once with "
    "`modelfleet-agent enroll --force` (a new agent id)"
)


def inference_security(
    cfg: ServeConfig,
) -> tuple[grpc.ServerCredentials | None, BearerTokenInterceptor | None, str, TlsFiles | None]:
    """(TLS credentials, token check, words for the log, TLS files) for the inference ports,
    from cfg: gRPC and HTTP get the same."""
    from modelfleet.agent.fleet.renew import CA, CERT, KEY, finish_pending
    from modelfleet.agent.fleet.transport import IDENTITY_DIR

    files: TlsFiles | None = None
    ident = cfg.data / IDENTITY_DIR
    if cfg.tls_agent_identity:
        # A renewal a crash interrupted is completed first: its key and certificate match.
        finish_pending(ident)
    client_ca = None
    ca_setting = "tls_client_ca"
    if cfg.tls_client_ca:
        client_ca = Path(cfg.tls_client_ca)
    elif cfg.tls_client_ca_hub:
        client_ca, ca_setting = ident / CA, "tls_client_ca_hub"
    if cfg.tls_agent_identity:
        files = TlsFiles(
            ident / CERT,
            ident / KEY,
            client_ca,
            cert_setting="tls_agent_identity",
            key_setting="tls_agent_identity",
            ca_setting=ca_setting,
            server_auth_fix=_RENEW_FOR_SERVER_AUTH,
        )
    elif cfg.tls_cert:
        files = TlsFiles(Path(cfg.tls_cert), Path(cfg.tls_key), client_ca, ca_setting=ca_setting)
    words = []
    credentials = None
    if files is not None:
        credentials = server_credentials(files)
        words.append(f"TLS with {files.cert}")
        if files.client_ca is not None:
            words.append(f"client certificates from {files.client_ca}")
    token = None
    if cfg.auth_token_file:
        token = BearerTokenInterceptor(Path(cfg.auth_token_file))
        words.append(f"bearer token from {cfg.auth_token_file}")
        if files is None:
            log.warning(
                "inference bearer token without TLS: anyone who can watch traffic to %s "
                "can read and replay it; set tls_cert and tls_key unless the port is "
                "loopback only",
                cfg.listen,
            )
    return credentials, token, ", ".join(words) or "plaintext, no authentication", files


def connect_control_plane(cfg: ServeConfig) -> ControlPlane:
    """The hub as ``cfg.transport`` reaches it: the one place that picks an adapter.

    ``grpc``: everything over gRPC; ``mqtt``: everything through the broker; ``both``: desired
    states from the broker, everything else over gRPC (docs/mqtt.md). Needs a running loop.
    """
    from modelfleet.agent.fleet.controlplane import SplitControlPlane
    from modelfleet.agent.fleet.grpc_plane import GrpcControlPlane
    from modelfleet.agent.fleet.mqtt_plane import MqttControlPlane
    from modelfleet.agent.fleet.renew import finish_pending
    from modelfleet.agent.fleet.transport import IDENTITY_DIR

    # Before the identity is read: a renewal cut short by a crash is completed or undone.
    if done := finish_pending(cfg.data / IDENTITY_DIR):
        log.warning("certificate renewal interrupted by a restart: %s", done)

    def grpc_plane() -> GrpcControlPlane:
        return GrpcControlPlane(
            cfg.hub,
            cfg.data,
            resync_interval_s=cfg.resync_interval_s,
            backoff_max_s=cfg.backoff_max_s,
        )

    def mqtt_plane() -> MqttControlPlane:
        return MqttControlPlane(
            cfg.mqtt,
            cfg.data,
            cfg.agent_id,
            resync_interval_s=cfg.resync_interval_s,
            capture_chunk_bytes=cfg.capture_mqtt_chunk_bytes,
        )

    if cfg.transport == "grpc":
        return grpc_plane()
    if cfg.transport == "mqtt":
        return mqtt_plane()
    if cfg.transport == "both":
        return SplitControlPlane(desired=mqtt_plane(), rest=grpc_plane())
    raise InvalidRequestError(
        f"config: transport must be grpc, mqtt or both, not {cfg.transport!r}"
    )


def build_slots(cfg: ServeConfig, metrics: AgentMetrics) -> SlotManager:
    return SlotManager(
        runtime=RuntimeOptions(
            cfg.intra_op_threads,
            cfg.inter_op_threads,
            cfg.device,
            spinning=cfg.ort_spinning,
            allowed_providers=allowed_providers(cfg),
            require_provider=cfg.require_provider,
            device_id=cfg.device_id,
            model_device_ids=model_device_ids(cfg),
            cache_dir=str(cfg.provider_cache_path()),
        ),
        batching=BatchingConfig(
            enabled=cfg.batching,
            max_queue_delay_us=cfg.max_queue_delay_us if cfg.max_queue_delay_us >= 0 else None,
            max_inflight=cfg.batch_inflight,
            inline_max_us=cfg.inline_max_us,
        ),
        metrics=metrics,
        serving_threads=cfg.serving_threads,
    )


def build_drift(cfg: ServeConfig, slots: SlotManager) -> DriftMonitor | None:
    """Drift accounting for versions with a reference (None when the setting is off); in
    fleet mode closed windows go into the telemetry reports, standalone to /metrics only."""
    if not cfg.drift:
        return None
    metrics = slots.metrics
    monitor = DriftMonitor(
        metrics,
        window_s=cfg.drift_window_s,
        sample_rate=cfg.drift_sample_rate,
        max_rows_per_s=cfg.drift_max_rows_per_s,
        metrics_features=cfg.drift_metrics_features,
        report=metrics.telemetry.drift if cfg.hub else None,
    )
    slots.drift_attach = monitor.attach
    return monitor


def loaded_versions(slots: SlotManager) -> set[tuple[str, int]]:
    return {(s.name, v.version) for s in slots.slots.values() for v in s.loaded()}


def build_capture(cfg: ServeConfig, metrics: AgentMetrics) -> Capture:
    """Inference capture (agent/serving/capture.py); nothing is written until a rule asks."""
    return Capture(
        CaptureLimits(
            cfg.capture_path(),
            queue_max=cfg.capture_queue_max,
            rotate_bytes=cfg.capture_rotate_bytes,
            rotate_s=cfg.capture_rotate_s,
            quota_bytes=cfg.capture_quota_bytes,
        ),
        metrics,
        Path(cfg.data),
    )


def check_repository(models: Path) -> None:
    """Standalone mode serves what is in ``models``: a missing folder is a typo, not a default."""
    if models.is_dir():
        return
    if models.exists():
        raise InvalidRequestError(
            f"model repository {models} is not a directory: pass the folder that holds "
            "NAME/VERSION/ bundles with --models DIR (setting models)"
        )
    raise InvalidRequestError(
        f"model repository {models} does not exist: create it (mkdir -p {models}) and put "
        "bundles in it as NAME/VERSION/ (`modelfleet-agent bundle create ... --out DIR`), or "
        "pass the right folder with --models DIR (setting models)"
    )


def standalone_unloads(cfg: ServeConfig) -> tuple[UnloadedRecord | None, list[str]]:
    """Model control's record of unloaded models (standalone, model control on) and what it
    holds; a damaged record stops the agent here, before anything is bound or loaded."""
    path = cfg.data / UNLOADED_FILE
    if cfg.hub:
        return None, []
    if not cfg.model_control:
        if path.exists():
            log.info(
                "model control is off: %s is not applied (the repository is served whole)", path
            )
        return None, []
    record = UnloadedRecord(path)
    return record, record.read()


def readiness_line(slots: SlotManager, mode: str, fleet: bool) -> str:
    """The log's READY / NOT READY line: the same verdict as `status` and ServerReady."""
    models = slots.status()
    serving = ", ".join(f"{s.name} v{s.active}" for s in models if s.active is not None)
    if slots.all_ready():
        return f"READY ({mode}): serving {serving}"
    waiting = [s.name for s in models if s.active is None]
    if waiting:
        why = f"serving {serving or 'nothing'}; no version serves yet for {', '.join(waiting)}"
    elif fleet:
        why = "no model yet: waiting for the hub's desired state"
    else:
        why = "no model in the repository yet (add bundles as NAME/VERSION/)"
    return f"NOT READY ({mode}): {why}"


def status_line(slots: SlotManager) -> str:
    """What ``systemctl status`` shows: e.g. ``serving fraud v2, mlp v1; 1 loading``."""
    models = slots.status()
    serving = ", ".join(f"{s.name} v{s.active}" for s in models if s.active is not None)
    loading = sum(1 for s in models if s.loading is not None)
    text = f"serving {serving or 'nothing'}; {loading} loading"
    waiting = [s.name for s in models if s.active is None and s.loading is None]
    if waiting:
        text += f"; not ready: {', '.join(waiting)}"
    return text


def start_tracing(cfg: ServeConfig) -> None:
    """OpenTelemetry on when tracing_endpoint is set (the SDK is imported only then)."""
    if not cfg.tracing_endpoint:
        return
    from modelfleet.agent import __version__

    tracing.start(
        TracingSettings(
            cfg.tracing_endpoint, cfg.tracing_sample_ratio, cfg.tracing_service_name, __version__
        )
    )
    log.info(
        "tracing: OTLP to %s, sampling %g of requests without a sampled parent",
        cfg.tracing_endpoint,
        cfg.tracing_sample_ratio,
    )


def http_inference_server(
    cfg: ServeConfig,
    slots: SlotManager,
    dataplane: DataPlane,
    health: HealthReporter,
    token_check: BearerTokenInterceptor | None,
    control: ModelControl,
    shm: SharedMemoryRegistry,
    listen: str,
    ssl_context: ssl.SSLContext | None,
) -> HttpServer:
    """The HTTP/REST edge over the same data plane (the agent's, and each serving worker's:
    with serving workers the port is shared)."""
    # Imported only for an HTTP port: aiohttp is a fifth of the agent's start-up CPU.
    from modelfleet.agent.serving.http_server import HttpServer, OipHttp

    return HttpServer(
        OipHttp(slots, dataplane, health, cfg.http_max_request_bytes, token_check, control, shm),
        listen,
        ssl_context,
        cfg.drain_timeout_s,
        reuse_port=cfg.serving_workers > 1,
    )


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


async def serve(cfg: ServeConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain; SIGHUP reloads the config.

    Under systemd (``Type=notify``): READY=1 once the agent can serve, STATUS= on every change
    of what it serves, WATCHDOG=1 from this event loop, RELOADING=1/READY=1 around a reload,
    STOPPING=1 when the drain begins.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = Notifier()
    # Pings from the loop itself, started before the (possibly long) first load so start-up
    # counts as alive only while the loop runs.
    watchdog = loop.create_task(notifier.run_watchdog())
    notifier.status("starting")

    # Before anything is bound or written: a second agent on the same repository or data, a
    # missing repository, a busy port or unusable TLS or token files stop the agent at once.
    admin_path = cfg.admin_socket_path()
    if not cfg.hub:
        check_repository(cfg.models)
    record, unloaded = standalone_unloads(cfg)
    claim_admin_socket(admin_path)
    check_listen(cfg.listen, "inference (listen)", "set another port with --listen")
    if cfg.metrics_listen:
        check_listen(
            cfg.metrics_listen, "metrics (metrics_listen)", "set another port with --metrics-listen"
        )
    if cfg.http_listen:
        check_listen(
            cfg.http_listen, "HTTP inference (http_listen)", "set another port with --http-listen"
        )
    credentials, token_check, security, tls_files = inference_security(cfg)
    ssl_context = server_ssl_context(tls_files) if cfg.http_listen and tls_files else None
    start_tracing(cfg)
    metrics = AgentMetrics()
    if cfg.serving_workers > 1 and not cfg.hub:
        # Workers count in slots of a shared file (fleet mode: the journal, attached later).
        cells = cfg.data / SERVING_CELLS_FILE
        try:
            cfg.data.mkdir(mode=0o700, parents=True, exist_ok=True)
            store = CounterStore.create(cells, JOURNAL_SLOTS * cfg.serving_workers)
        except OSError as exc:
            raise InvalidRequestError(
                f"serving_workers = {cfg.serving_workers} needs a writable data folder for the "
                f"processes' shared counters, and {cells} cannot be created ({exc.strerror or exc})"
                ": give the agent a folder of its own with --data DIR (setting data), or set "
                "serving_workers = 1"
            ) from None
        metrics.telemetry.attach(store)
    slots = build_slots(cfg, metrics)
    drift = build_drift(cfg, slots)
    capture = build_capture(cfg, metrics)
    await asyncio.to_thread(capture.recover)
    if not cfg.hub:
        capture.set_rules(LocalRules(capture.limits.dir).load())
    dataplane = DataPlane(
        slots,
        metrics,
        ShadowRunner(metrics, cfg.shadow_queue_max, cfg.shadow_workers),
        capture,
        Admission(Limits.from_settings(cfg)),
    )
    health = HealthReporter(slots)
    refresh_pending = False
    ready = False
    stopping = False
    source: Any = None
    workers: ServingWorkers | None = None
    # Strong references: the event loop keeps only weak ones to tasks.
    background: set[asyncio.Task] = set()

    shown = ""
    mode = ""
    # What the log last said (READY or NOT READY): a line is logged each time that changes.
    logged_ready = False

    def log_readiness() -> None:
        nonlocal logged_ready
        now_ready = slots.all_ready()
        if now_ready != logged_ready:
            logged_ready = now_ready
            log.info("%s", readiness_line(slots, mode, bool(cfg.hub)))

    def publish_status() -> None:
        nonlocal shown
        text = status_line(slots)
        if ready and not stopping:
            log_readiness()
        if ready and not stopping and text != shown:
            shown = text
            notifier.status(text)
            log.debug("status: %s", text)

    def on_change(_name: str) -> None:
        nonlocal refresh_pending
        if not refresh_pending:
            refresh_pending = True

            async def refresh() -> None:
                nonlocal refresh_pending
                refresh_pending = False
                await health.refresh()
                publish_status()

            task = loop.create_task(refresh())
            background.add(task)
            task.add_done_callback(background.discard)

    def reload() -> None:
        """SIGHUP: runs on the loop (add_signal_handler), so it never races a request."""
        if stopping:
            log.info("SIGHUP while shutting down: ignored")
            return
        if ready:
            notifier.reloading("reloading configuration")

        def applied(_changed: list[str]) -> None:
            if isinstance(source, RepositoryWatcher):
                source.interval_s = cfg.poll_interval_s

        reload_logged(cfg, reload_config, RELOADABLE, log, applied)
        if token_check is not None:
            token_check.reload()
        if workers is not None:
            workers.reload()
        if ready:
            notifier.ready(shown)

    loop.add_signal_handler(signal.SIGHUP, reload)
    slots.listeners.append(on_change)
    await health.refresh()

    # Standalone, the watcher is made here so that model control (load/unload over the
    # protocol) can go through it; it starts polling only once the server is up.
    watcher = None if cfg.hub else RepositoryWatcher(cfg.models, slots, cfg.poll_interval_s, record)
    if watcher is not None:
        watcher.restore(unloaded)
    control = ModelControl(watcher, cfg.hub, enabled=cfg.model_control)
    # One registry for both transports: a region registered over gRPC serves HTTP too.
    shm = SharedMemoryRegistry()
    server, port = build_server(
        slots,
        dataplane,
        health,
        cfg.listen,
        cfg.max_message_bytes,
        credentials,
        [token_check] if token_check else [],
        control,
        shm,
        reuse_port=cfg.serving_workers > 1,
    )
    await server.start()
    bound = f"{cfg.listen.rpartition(':')[0]}:{port}"
    admin = build_admin_server(
        slots,
        admin_path,
        bound,
        fleet_hub=cfg.hub,
        models=None if cfg.hub else cfg.models,
        capture=capture,
    )
    await admin.start()
    os.chmod(admin_path, 0o600)
    http: HttpServer | None = None
    if cfg.http_listen:
        http = http_inference_server(
            cfg, slots, dataplane, health, token_check, control, shm, cfg.http_listen, ssl_context
        )
        try:
            http_port = await http.start()
        except ListenError:
            await server.stop(0)
            await admin.stop(0)
            admin_path.unlink(missing_ok=True)
            raise
        scheme = "https" if ssl_context else "http"
        host = cfg.http_listen.rpartition(":")[0]
        log.info("HTTP/REST inference on %s://%s:%d/v2 (%s)", scheme, host, http_port, security)
    # Removed at exit only if it is still this one (see claim_admin_socket).
    admin_inode = _inode(admin_path)
    if cfg.metrics_listen:
        host, mport = split_hostport(cfg.metrics_listen, "metrics_listen")
        try:
            metrics.serve_http(host, mport)
        except OSError as exc:
            await server.stop(0)
            await admin.stop(0)
            if http is not None:
                await http.stop()
            admin_path.unlink(missing_ok=True)
            raise ListenError(f"cannot serve metrics on {cfg.metrics_listen}: {exc}") from None
        log.info("metrics on http://%s/metrics", cfg.metrics_listen)
    log.info(
        "listening on %s (port %d; %s); admin socket %s", cfg.listen, port, security, admin_path
    )

    if cfg.hub:
        from modelfleet.agent.fleet.sync import FleetSync

        source = FleetSync(cfg, slots, bound, connect_control_plane(cfg), capture)
        notifier.status("starting: restoring cached models")
        # Serve what was cached and verified before, whether or not the hub answers.
        await source.restore()
        mode = f"fleet mode, hub {cfg.hub}"
    else:
        source = watcher
        notifier.status(f"starting: loading models from {cfg.models}")
        # Load what is on disk before declaring readiness; readiness means "can serve now".
        await source.sync_once()
        mode = f"standalone, repository {cfg.models}"
    if cfg.serving_workers > 1:
        http_bound = f"{cfg.http_listen.rpartition(':')[0]}:{http.port}" if http else ""
        workers = ServingWorkers(
            cfg, bound, slots, control, cfg.serving_workers, http_bound, capture
        )
        slots.replicas = workers
        slots.listeners.append(workers.publish)
        capture.listeners.append(workers.publish)
        metrics.processes = workers.shares
        notifier.status(f"starting: {cfg.serving_workers - 1} serving worker(s)")
        await workers.start()
        if cfg.drift or cfg.hub:
            # Sampled features see one process's share: say so once, where operators look.
            log.info(
                "shadow copies and drift sample this process's share of the connections "
                "(about 1/%d of the traffic); served counts and capture include every process",
                cfg.serving_workers,
            )
        log.info(
            "%d processes answer inference on %s (this one and %d worker(s), pids %s)",
            cfg.serving_workers,
            bound,
            cfg.serving_workers - 1,
            ", ".join(str(p) for p in workers.pids()) or "none yet",
        )
    await health.refresh()
    # Started (systemd READY=1 below): the line says whether it can serve, as `status` does.
    logged_ready = slots.all_ready()
    text = readiness_line(slots, mode, bool(cfg.hub))
    if logged_ready or cfg.hub:
        log.info("%s", text)
    else:
        # Standalone with nothing to serve: most likely the wrong --models.
        log.warning("%s", text)
    ready = True
    shown = status_line(slots)
    notifier.ready(shown)
    # The source gets its own stop: it winds down (and flushes what it reports to the hub)
    # only after the drain, so what it sends last includes the drained requests.
    source_stop = asyncio.Event()
    watch_task = loop.create_task(source.run(source_stop))
    drift_stop = asyncio.Event()
    drift_task = (
        loop.create_task(drift.run(drift_stop, lambda: loaded_versions(slots)))
        if drift is not None
        else None
    )
    try:
        await stop.wait()
    finally:
        stopping = True
        log.info("shutting down: draining in-flight requests (up to %gs)", cfg.drain_timeout_s)
        # NOT_SERVING first, so balancers stop routing here while in-flight requests finish.
        health.draining = True
        await health.refresh()
        notifier.stopping(f"stopping: draining in-flight requests (up to {cfg.drain_timeout_s:g}s)")
        # Both inference ports drain at once, and the serving workers with them; HTTP's grace
        # is drain_timeout_s too.
        await asyncio.gather(
            server.stop(grace=cfg.drain_timeout_s),
            http.stop() if http is not None else asyncio.sleep(0),
            workers.stop(cfg.drain_timeout_s) if workers is not None else asyncio.sleep(0),
        )
        if drift_task is not None:
            # The drained requests' window is closed now, so the final report carries it.
            drift_stop.set()
            await drift_task
        source_stop.set()
        await watch_task
        await admin.stop(grace=0)
        await dataplane.close()
        slots.close()
        # After the drain and the shadow runs: their spans are in the last export.
        tracing.stop()
        found = _inode(admin_path)
        if found is not None and found == admin_inode:
            admin_path.unlink(missing_ok=True)
        elif found is not None:
            log.warning("admin socket %s is another process's now: left in place", admin_path)
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        log.info("stopped")
