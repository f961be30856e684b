"""Agent settings: one dataclass, loaded from TOML, then environment, then command line.

Every key is documented in docs/configuration.md; the defaults are the documented limits.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.kernel.settings import ConfigOrigin, apply_reloadable, load_settings, split_hostport
from modelfleet.kernel.tracing import check_settings as check_tracing

ENV_PREFIX = "MODELFLEET_AGENT_"

# Keys a SIGHUP applies to the running agent. They are read where they are used (logging set-up,
# the repository poll, the shutdown path, the fleet report and watch loops), so changing them in
# place is enough. Every other key is fixed at start (sockets, thread pools, sessions, the hub
# identity): a changed one is reported as needing a restart and keeps its running value.
RELOADABLE = frozenset(
    {
        "log_level",
        "log_json",
        "poll_interval_s",
        "drain_timeout_s",
        "report_interval_s",
        "resync_interval_s",
    }
)


@dataclass
class ServeConfig:
    # Local model repository: DIR/<name>/<version>/ bundles.
    models: Path = Path("models")
    # Open Inference Protocol gRPC endpoint.
    listen: str = "127.0.0.1:8001"
    # Prometheus /metrics over HTTP; empty disables it.
    metrics_listen: str = ""
    # Open Inference Protocol over HTTP/REST (docs/protocol.md); empty disables it. Same TLS and
    # bearer token settings as `listen`.
    http_listen: str = ""
    # HTTP request bodies above this many bytes are refused with 413.
    http_max_request_bytes: int = 64 * 1024 * 1024
    # The protocol's model load/unload on the inference ports (standalone only). Off by default,
    # as in Triton: with it on, any client allowed to infer can unload every model.
    model_control: bool = False
    # Local admin API (status, rollback); empty means <models>/.modelfleet-admin.sock.
    admin_socket: str = ""
    # Seconds between repository scans.
    poll_interval_s: float = 1.0
    # Threads that run inference (onnxruntime releases the GIL while computing).
    serving_threads: int = 2
    # Processes that answer gRPC inference on `listen` (agent/workers.py): this one and N-1
    # workers sharing the port (SO_REUSEPORT).
    serving_workers: int = 1
    # onnxruntime threads per session; 0 lets onnxruntime choose.
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # cpu, cuda or auto (docs/gpu.md).
    device: str = "auto"
    # Execution providers this node may use, comma-separated (empty: any onnxruntime has); CPU
    # is always the last resort.
    allowed_providers: str = ""
    # A version must serve on its first preferred provider, or it fails its gate.
    require_provider: bool = False
    # GPU for CUDA/TensorRT sessions, and per-model exceptions as "model=id,model=id".
    device_id: int = 0
    model_device_ids: str = ""
    # Dynamic batching for models whose bundle allows a batch dimension.
    batching: bool = True
    # Overrides the bundles' max_queue_delay_us when >= 0.
    max_queue_delay_us: int = -1
    # Batches computing at once per model version.
    batch_inflight: int = 1
    # Let onnxruntime's worker threads spin between operators (lower latency when the machine is
    # otherwise idle; set false where sessions share few cores).
    ort_spinning: bool = True
    # Cores a scheduled batch job may use (onnxruntime and DuckDB), so serving keeps the rest.
    batch_threads: int = 1
    # Models whose fastest health-gate run is under this many microseconds run on the event
    # loop, unbatched: for them the thread hop costs more than the model. 0 disables.
    inline_max_us: int = 200
    # Shadow runs (docs/operations.md#comparing-versions-on-live-traffic): copies waiting for the
    # shadow version beyond this many are dropped and counted, never waited for.
    shadow_queue_max: int = 64
    # Threads that run shadow copies, apart from the serving threads.
    shadow_workers: int = 1
    # Drift (docs/monitoring.md#drift-on-the-agent), for versions whose bundle has a reference:
    # seconds per window; the share of requests whose rows are counted; at most this many rows
    # per second and version (the rest of that second is skipped and counted; 0: no cap); the
    # features per version with a /metrics series (the most drifted of the latest window).
    drift: bool = True
    drift_window_s: float = 300.0
    drift_sample_rate: float = 1.0
    drift_max_rows_per_s: int = 250
    drift_metrics_features: int = 32
    # -- inference port security (docs/security.md#the-inference-port); default: plaintext, open
    # Server certificate chain and its private key (PEM files): both set, `listen` speaks TLS.
    tls_cert: str = ""
    tls_key: str = ""
    # CA bundle (PEM): clients must present a certificate it issued (mutual TLS).
    tls_client_ca: str = ""
    # Fleet mode: serve with the agent's enrolled certificate and key (renewals picked up).
    tls_agent_identity: bool = False
    # Fleet mode: clients must present a certificate issued by the hub's CA (mutual TLS).
    tls_client_ca_hub: bool = False
    # File holding the bearer token every inference/metadata RPC must carry; empty: none.
    auth_token_file: str = ""
    # gRPC message size limit, both directions.
    max_message_bytes: int = 64 * 1024 * 1024
    # -- guardrails (docs/operations.md#guardrails); 0 means the auto value
    # Per model: requests admitted and not yet answered (auto: 64 per serving thread), and their
    # rows (auto: 8 full batches per serving thread, at least max_concurrent_requests). Beyond
    # either a request is shed with RESOURCE_EXHAUSTED instead of queued.
    max_concurrent_requests: int = 0
    max_queued_rows: int = 0
    # Total input bytes of one request (auto: max_message_bytes); beyond: RESOURCE_EXHAUSTED.
    max_request_bytes: int = 0
    # Per-client token bucket (certificate identity under mutual TLS, else address): requests
    # per second, 0 turns it off; burst (auto: the rate rounded up); clients tracked at most.
    rate_limit_per_s: float = 0.0
    rate_limit_burst: int = 0
    rate_limit_clients: int = 10_000
    # Seconds to let in-flight requests finish on shutdown.
    drain_timeout_s: float = 10.0
    log_level: str = "INFO"
    log_json: bool = False
    # -- fleet mode (`modelfleet-agent run`); written by `modelfleet-agent enroll` ---------------
    # The hub's mTLS address; empty means standalone mode.
    hub: str = ""
    agent_id: str = ""
    # Agent state: identity, TUF metadata, bundle cache, last desired state.
    data: Path = Path("agent-data")
    # A fresh watch stream (and so a full resync) at least this often, in seconds.
    resync_interval_s: float = 30.0
    # Heartbeat: state report to the hub at least this often, in seconds.
    report_interval_s: float = 10.0
    # Bundle cache size cap; versions neither desired nor loaded are collected first.
    cache_max_bytes: int = 10 * 1024**3
    # Free disk space that downloads must leave untouched.
    disk_reserve_bytes: int = 64 * 1024 * 1024
    # Upper bound of the reconnect backoff (full jitter), in seconds.
    backoff_max_s: float = 30.0
    # Renew the agent's certificate (new key) this many seconds before it expires, or at half
    # its lifetime if that comes sooner.
    cert_renew_before_s: float = 30 * 86400
    # grpc (everything over gRPC), mqtt (everything through the broker) or both (desired state
    # through the broker, bytes and reports over gRPC).
    transport: str = "grpc"
    # MQTT broker HOST:PORT (from enrollment when the hub has one).
    mqtt: str = ""
    # The agent.toml that `modelfleet-agent enroll` wrote (agent_id, hub, data, listen, mqtt,
    # transport). When set and present, it is read before this file, and this file's own keys
    # win: an operator-owned /etc/modelfleet/agent.toml then needs no copy of enrollment keys.
    enrollment: str = ""
    # Not a setting (refused in the file and the environment): set by load_config.
    origin: ConfigOrigin | None = field(default=None, repr=False, compare=False)
    # Fleet telemetry (docs/telemetry.md): seconds per report, and how many unacknowledged
    # reports the on-disk outbox keeps (the oldest are dropped and counted beyond that).
    telemetry_interval_s: float = 5.0
    telemetry_outbox_max_reports: int = 10_000
    # OpenTelemetry tracing (docs/monitoring.md#tracing): the OTLP/gRPC collector, e.g.
    # http://127.0.0.1:4317; empty (the default) turns tracing off and loads no tracing code.
    tracing_endpoint: str = ""
    # Share of requests without a sampled caller's context that are traced, 0..1.
    tracing_sample_ratio: float = 1.0
    # service.name of the spans.
    tracing_service_name: str = "modelfleet-agent"
    # Inference capture (docs/monitoring.md#inference-capture): which models and how much comes
    # from the hub (fleet) or `modelfleet-agent capture` (standalone). Files go to this folder
    # (empty: <data>/capture); sampled requests beyond capture_queue_max waiting for the writer
    # are dropped and counted; a file is finished at capture_rotate_bytes or after
    # capture_rotate_s; complete files beyond capture_quota_bytes are deleted oldest first.
    capture_dir: str = ""
    capture_queue_max: int = 1024
    capture_rotate_bytes: int = 16 * 1024 * 1024
    capture_rotate_s: float = 300.0
    capture_quota_bytes: int = 1024**3
    # Fleet mode: seconds between looks for complete files to ship to the hub.
    capture_ship_interval_s: float = 10.0
    # Fleet mode over MQTT (transport = "mqtt"): file bytes per capture chunk message, 4 KiB to
    # 1 MiB (the hub refuses larger ones).
    capture_mqtt_chunk_bytes: int = 256 * 1024

    def capture_path(self) -> Path:
        return Path(self.capture_dir) if self.capture_dir else self.data / "capture"

    def provider_cache_path(self) -> Path:
        """Execution providers' caches (TensorRT engines), one private folder per version."""
        return self.data / "provider-cache"

    def admin_socket_path(self) -> Path:
        if self.admin_socket:
            return Path(self.admin_socket)
        if self.hub:
            return self.data / "admin.sock"
        return self.models / ".modelfleet-admin.sock"


def load_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> ServeConfig:
    """TOML file (``[agent]`` table or top level), then MODELFLEET_AGENT_* env, then overrides.

    With ``enrollment`` set, that file comes first: enrollment < file < environment < overrides.
    """
    cfg = load_settings(
        ServeConfig, path, table="agent", env_prefix=ENV_PREFIX, overrides=overrides, env=env
    )
    if cfg.origin is not None:
        raise InvalidRequestError("config: unknown key(s) origin")
    if cfg.enrollment:
        _apply_enrollment(cfg, Path(cfg.enrollment), path, overrides, env)
    cfg.origin = ConfigOrigin(path, dict(overrides or {}), env)
    validate(cfg)
    return cfg


def _table_keys(path: Path, table: str) -> set[str]:
    """The keys a TOML settings file sets (load_settings has already parsed and checked it)."""
    data = tomllib.loads(path.read_text())
    return set(data.get(table, data))


def _apply_enrollment(
    cfg: ServeConfig,
    enrolled: Path,
    path: Path | None,
    overrides: Mapping[str, Any] | None,
    env: Mapping[str, str] | None,
) -> None:
    """Fill in what the enrollment file sets and no later source (file, env, flag) does."""
    if not enrolled.exists():
        # Not enrolled yet: `run` refuses to start without a hub, which says what to do.
        return
    base = load_settings(ServeConfig, enrolled, table="agent", env_prefix=ENV_PREFIX, env={})
    environ = os.environ if env is None else env
    explicit = _table_keys(path, "agent") if path is not None else set()
    explicit |= {n for n in _setting_names() if ENV_PREFIX + n.upper() in environ}
    explicit |= {k for k, v in (overrides or {}).items() if v is not None}
    for name in _table_keys(enrolled, "agent") - explicit - {"enrollment", "origin"}:
        setattr(cfg, name, getattr(base, name))


def _setting_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ServeConfig) if f.name != "origin"]


def reload_config(cfg: ServeConfig) -> tuple[list[str], list[str]]:
    """Read cfg's sources again and apply what can change at run time (see RELOADABLE).

    Returns (applied keys, keys that changed but need a restart). A config that no longer
    loads raises, and the running one stays as it was.
    """
    if cfg.origin is None:
        raise InvalidRequestError("config: not loaded by load_config, nothing to reload")
    fresh = load_config(cfg.origin.path, dict(cfg.origin.overrides), cfg.origin.env)
    return apply_reloadable(cfg, fresh, RELOADABLE)


# sockaddr_un's sun_path holds 108 bytes with the terminating NUL; longer paths cannot be bound.
ADMIN_SOCKET_MAX_BYTES = 107


def check_admin_socket_path(path: Path) -> None:
    """Refuse an admin socket path the kernel cannot bind or connect to (too long)."""
    size = len(os.fsencode(path))
    if size > ADMIN_SOCKET_MAX_BYTES:
        raise InvalidRequestError(
            f"admin socket path {path} is {size} bytes; Unix sockets allow at most "
            f"{ADMIN_SOCKET_MAX_BYTES}: give a shorter one with --admin-socket PATH (setting "
            "admin_socket), e.g. /run/modelfleet/admin.sock"
        )


def allowed_providers(cfg: ServeConfig) -> tuple[str, ...]:
    return tuple(p.strip() for p in cfg.allowed_providers.split(",") if p.strip())


def model_device_ids(cfg: ServeConfig) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for item in cfg.model_device_ids.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        try:
            device = int(value)
        except ValueError:
            device = -1
        if not sep or not name.strip() or device < 0:
            raise InvalidRequestError(
                f"config: model_device_ids takes MODEL=DEVICE_ID pairs separated by commas "
                f'(e.g. "resnet=1,bert=0"), not {item.strip()!r}'
            )
        out.append((name.strip(), device))
    return tuple(out)


def _validate_providers(cfg: ServeConfig) -> None:
    if cfg.device_id < 0:
        raise InvalidRequestError("config: device_id must be >= 0")
    model_device_ids(cfg)
    if not allowed_providers(cfg):
        return
    import onnxruntime as ort  # only here: most commands that read the config never need it

    known = ort.get_all_providers()
    unknown = [p for p in allowed_providers(cfg) if p not in known]
    if unknown:
        raise InvalidRequestError(
            f"config: allowed_providers names unknown provider(s) {', '.join(unknown)}; valid "
            f"names: {', '.join(known)}"
        )


def validate(cfg: ServeConfig) -> None:
    if cfg.device not in ("cpu", "cuda", "auto"):
        raise InvalidRequestError(f"config: device must be cpu, cuda or auto, not {cfg.device!r}")
    _validate_providers(cfg)
    if not 1 <= cfg.serving_workers <= 64:
        raise InvalidRequestError("config: serving_workers must be between 1 and 64")
    for name in ("serving_threads", "batch_inflight", "batch_threads", "shadow_workers"):
        if getattr(cfg, name) < 1:
            raise InvalidRequestError(f"config: {name} must be >= 1")
    if cfg.shadow_queue_max < 0:
        raise InvalidRequestError("config: shadow_queue_max must be >= 0 (0 drops every copy)")
    if cfg.drift_window_s <= 0 or not 0.0 <= cfg.drift_sample_rate <= 1.0:
        raise InvalidRequestError(
            "config: drift_window_s must be > 0 and drift_sample_rate between 0 and 1"
        )
    if cfg.drift_max_rows_per_s < 0 or cfg.drift_metrics_features < 0:
        raise InvalidRequestError(
            "config: drift_max_rows_per_s and drift_metrics_features must be >= 0"
        )
    if cfg.max_message_bytes < 1024:
        raise InvalidRequestError("config: max_message_bytes must be at least 1024")
    for name in ("max_concurrent_requests", "max_queued_rows", "max_request_bytes"):
        if getattr(cfg, name) < 0:
            raise InvalidRequestError(f"config: {name} must be >= 0 (0: the automatic limit)")
    if cfg.rate_limit_per_s < 0 or cfg.rate_limit_burst < 0 or cfg.rate_limit_clients < 1:
        raise InvalidRequestError(
            "config: rate_limit_per_s and rate_limit_burst must be >= 0 (0: off, 0: auto) and "
            "rate_limit_clients >= 1"
        )
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise InvalidRequestError(f"config: unknown log_level {cfg.log_level!r}")
    if cfg.drain_timeout_s < 0 or cfg.intra_op_threads < 0 or cfg.inter_op_threads < 0:
        raise InvalidRequestError("config: drain_timeout_s and thread counts must be >= 0")
    if cfg.transport not in ("grpc", "mqtt", "both"):
        raise InvalidRequestError(
            f"config: transport must be grpc, mqtt or both, not {cfg.transport!r}"
        )
    if cfg.hub and cfg.transport != "grpc" and not cfg.mqtt:
        raise InvalidRequestError(f"config: transport {cfg.transport} needs an mqtt address")
    if cfg.poll_interval_s <= 0:
        raise InvalidRequestError("config: poll_interval_s must be > 0")
    if cfg.cert_renew_before_s <= 0:
        raise InvalidRequestError("config: cert_renew_before_s must be > 0")
    if cfg.telemetry_interval_s <= 0 or cfg.telemetry_outbox_max_reports < 1:
        raise InvalidRequestError(
            "config: telemetry_interval_s must be > 0 and telemetry_outbox_max_reports >= 1"
        )
    check_tracing(cfg.tracing_endpoint, cfg.tracing_sample_ratio)
    if cfg.capture_queue_max < 0 or cfg.capture_rotate_bytes < 1 or cfg.capture_quota_bytes < 1:
        raise InvalidRequestError(
            "config: capture_queue_max must be >= 0, capture_rotate_bytes and "
            "capture_quota_bytes >= 1"
        )
    if not 4096 <= cfg.capture_mqtt_chunk_bytes <= 1024 * 1024:
        raise InvalidRequestError(
            f"config: capture_mqtt_chunk_bytes must be 4096 to 1048576 (1 MiB), not "
            f"{cfg.capture_mqtt_chunk_bytes}"
        )
    if cfg.capture_rotate_s <= 0 or cfg.capture_ship_interval_s <= 0:
        raise InvalidRequestError(
            "config: capture_rotate_s and capture_ship_interval_s must be > 0"
        )
    split_hostport(cfg.listen, "listen")
    check_admin_socket_path(cfg.admin_socket_path())
    _validate_tls(cfg)
    if cfg.metrics_listen:
        split_hostport(cfg.metrics_listen, "metrics_listen")
    if cfg.http_listen:
        split_hostport(cfg.http_listen, "http_listen")
    if cfg.http_max_request_bytes < 1024:
        raise InvalidRequestError("config: http_max_request_bytes must be at least 1024")


def _validate_tls(cfg: ServeConfig) -> None:
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise InvalidRequestError(
            "config: tls_cert and tls_key go together: set both (server certificate chain and "
            "its private key, PEM) or neither"
        )
    if not cfg.hub:
        for name in ("tls_agent_identity", "tls_client_ca_hub"):
            if getattr(cfg, name):
                raise InvalidRequestError(
                    f"config: {name} uses the identity an enrolled agent holds, so it works in "
                    "fleet mode only (`modelfleet-agent run`); standalone, name files with "
                    "tls_cert, tls_key and tls_client_ca"
                )
    if cfg.tls_agent_identity and cfg.tls_cert:
        raise InvalidRequestError(
            "config: set either tls_agent_identity or tls_cert/tls_key (the server certificate "
            "comes from one of them), not both"
        )
    if cfg.tls_client_ca_hub and cfg.tls_client_ca:
        raise InvalidRequestError(
            "config: set either tls_client_ca_hub or tls_client_ca, not both (to accept both, "
            "put the hub's CA certificate into the tls_client_ca bundle)"
        )
    serves_tls = cfg.tls_cert or cfg.tls_agent_identity
    if (cfg.tls_client_ca or cfg.tls_client_ca_hub) and not serves_tls:
        raise InvalidRequestError(
            "config: client certificates (tls_client_ca, tls_client_ca_hub) need TLS: set "
            "tls_cert and tls_key, or tls_agent_identity in fleet mode"
        )
