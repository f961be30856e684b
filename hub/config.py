"""Hub settings: TOML (``[hub]`` table), then MODELFLEET_HUB_* environment, then flags.

Every key is documented in docs/configuration.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelfleet.kernel.errors import InvalidRequestError
from modelfleet.kernel.settings import ConfigOrigin, apply_reloadable, load_settings, split_hostport
from modelfleet.kernel.tracing import check_settings as check_tracing

ENV_PREFIX = "MODELFLEET_HUB_"

# Keys a SIGHUP applies to the running hub; each is read where it is used (logging set-up, the
# TUF refresher, every upload and every download). The rest (sockets, certificates, metadata
# expiry policy, MQTT bridge) is fixed at start and reported as needing a restart.
RELOADABLE = frozenset(
    {
        "log_level",
        "log_json",
        "refresh_interval_s",
        "transfer_rate_limit_mbps",
        "max_bundle_bytes",
        "drain_timeout_s",
        # Read by the alert evaluator and the webhook sender every round.
        "alert_interval_s",
        "webhook_max_attempts",
        "webhook_backoff_s",
        "webhook_backoff_max_s",
        "webhook_timeout_s",
        # Read by the audit interceptor on every call.
        "audit_reads",
    }
)


@dataclass
class HubConfig:
    # State directory: registry (SQLite), blobs, TUF metadata, keys, CA, admin identity.
    data: Path = Path("hub-data")
    # mTLS endpoint for agents and the admin CLI.
    listen: str = "127.0.0.1:7443"
    # Server-authenticated TLS endpoint for enrollment only; empty: listen's port + 1.
    enroll_listen: str = ""
    # Addresses handed to agents (tokens, enrollment); empty: the listen addresses.
    advertise: str = ""
    advertise_enroll: str = ""
    # MQTT broker (HOST:PORT) the hub bridges to; empty: no MQTT. `modelfleet-hub mqtt-config`
    # writes the broker's configuration and the hub's MQTT identity.
    mqtt: str = ""
    # Broker address handed to agents at enrollment; empty: the mqtt value.
    advertise_mqtt: str = ""
    # Validity (nextUpdate) of the CRL the hub writes for the broker (docs/mqtt.md); it is
    # issued again when half of it has passed. The broker refuses every client once it lapses.
    crl_lifetime_s: float = 7 * 86400
    # Seconds between the MQTT bridge's re-checks of every agent's desired state when no change
    # was signalled (changes are published at once; this is the safety net).
    mqtt_resync_interval_s: float = 30.0
    # Extra names for the hub's server certificate, comma-separated (localhost and the
    # listen host are always included).
    hostnames: str = ""
    # Seconds between checks that re-sign timestamp/snapshot before they expire.
    refresh_interval_s: float = 60.0
    # TUF metadata lifetimes in seconds.
    root_expiry_s: float = 365 * 86400
    targets_expiry_s: float = 365 * 86400
    snapshot_expiry_s: float = 7 * 86400
    timestamp_expiry_s: float = 86400
    # Lifetime of the certificates issued to agents (at enrollment and at each renewal, which
    # agents ask for on their own before expiry).
    agent_cert_lifetime_s: float = 365 * 86400
    # Largest bundle archive accepted by publish.
    max_bundle_bytes: int = 4 * 1024**3
    # Per-download rate limit in MB/s for constrained links; 0 means unlimited.
    transfer_rate_limit_mbps: float = 0.0
    # gRPC message limit, both directions.
    max_message_bytes: int = 64 * 1024 * 1024
    # Stored capture files of one agent at most (all models); uploads past it are refused.
    capture_agent_quota_bytes: int = 8 * 1024**3
    # An agent not heard from for this long is shown as offline.
    offline_after_s: float = 60.0
    # The hub's own Prometheus /metrics (fleet aggregates) on HOST:PORT; empty: off.
    metrics_listen: str = ""
    # Telemetry older than this (seconds) is deleted, and not stored when it arrives; 0 keeps all.
    telemetry_retention_s: float = 7 * 86400
    # Audit trail (docs/security.md#audit-trail): entries older than this many days are
    # deleted; 0 keeps every entry.
    audit_retention_days: float = 365.0
    # Also record admin reads that succeed (list, status, metrics calls); off, changes,
    # exports and every refused or failed call are recorded.
    audit_reads: bool = False
    # Seconds that in-flight calls (uploads, downloads, watch streams) get on SIGTERM.
    drain_timeout_s: float = 5.0
    # Seconds between evaluations of the alert rules (docs/monitoring.md).
    alert_interval_s: float = 5.0
    # Webhook notifications: attempts before one is given up (kept as failed), the first retry
    # delay (doubling per attempt, with jitter) and its cap, and the per-attempt HTTP timeout.
    webhook_max_attempts: int = 12
    webhook_backoff_s: float = 1.0
    webhook_backoff_max_s: float = 300.0
    webhook_timeout_s: float = 10.0
    # OpenTelemetry tracing (docs/monitoring.md#tracing): the OTLP/gRPC collector, e.g.
    # http://127.0.0.1:4317; empty (the default) turns tracing off and loads no tracing code.
    tracing_endpoint: str = ""
    # Share of operations without a sampled caller's context that are traced, 0..1.
    tracing_sample_ratio: float = 1.0
    # service.name of the spans.
    tracing_service_name: str = "modelfleet-hub"
    log_level: str = "INFO"
    log_json: bool = False
    # Not a setting (refused in the file and the environment): set by load_hub_config.
    origin: ConfigOrigin | None = field(default=None, repr=False, compare=False)

    def enroll_address(self) -> str:
        if self.enroll_listen:
            return self.enroll_listen
        host, port = split_hostport(self.listen, "listen")
        return f"{host}:{port + 1 if port else 0}"

    def advertised(self, bound_port: int) -> str:
        if self.advertise:
            return self.advertise
        host, _ = split_hostport(self.listen, "listen")
        return f"{host}:{bound_port}"

    def advertised_enroll(self, bound_port: int) -> str:
        if self.advertise_enroll:
            return self.advertise_enroll
        host, _ = split_hostport(self.enroll_address(), "enroll_listen")
        return f"{host}:{bound_port}"


def load_hub_config(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> HubConfig:
    cfg = load_settings(
        HubConfig, path, table="hub", env_prefix=ENV_PREFIX, overrides=overrides, env=env
    )
    if cfg.origin is not None:
        raise InvalidRequestError("config: unknown key(s) origin")
    cfg.origin = ConfigOrigin(path, dict(overrides or {}), env)
    split_hostport(cfg.listen, "listen")
    split_hostport(cfg.enroll_address(), "enroll_listen")
    if cfg.timestamp_expiry_s <= 0 or cfg.snapshot_expiry_s <= 0:
        raise InvalidRequestError("config: metadata expiries must be positive")
    if cfg.agent_cert_lifetime_s < 10:
        raise InvalidRequestError("config: agent_cert_lifetime_s must be at least 10 seconds")
    if cfg.capture_agent_quota_bytes <= 0:
        raise InvalidRequestError(
            "config: capture_agent_quota_bytes must be > 0 "
            f"(got {cfg.capture_agent_quota_bytes}); e.g. 8589934592 (8 GiB)"
        )
    if cfg.mqtt_resync_interval_s <= 0:
        raise InvalidRequestError(
            f"config: mqtt_resync_interval_s must be > 0, got {cfg.mqtt_resync_interval_s:g}"
        )
    if cfg.crl_lifetime_s < 2:
        raise InvalidRequestError(
            f"config: crl_lifetime_s must be at least 2 seconds, got {cfg.crl_lifetime_s:g} "
            "(it should be days: the broker refuses every client once the CRL lapses)"
        )
    if cfg.refresh_interval_s <= 0:
        raise InvalidRequestError("config: refresh_interval_s must be > 0")
    _check_refresh_interval(cfg)
    if cfg.drain_timeout_s < 0:
        raise InvalidRequestError("config: drain_timeout_s must be >= 0")
    if cfg.audit_retention_days < 0:
        raise InvalidRequestError(
            f"config: audit_retention_days must be >= 0 (0 keeps every entry), got "
            f"{cfg.audit_retention_days:g}"
        )
    _check_alerting(cfg)
    check_tracing(cfg.tracing_endpoint, cfg.tracing_sample_ratio)
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise InvalidRequestError(f"config: unknown log_level {cfg.log_level!r}")
    return cfg


def _check_refresh_interval(cfg: HubConfig) -> None:
    """Timestamp and snapshot are re-signed once less than half their lifetime is left, at the
    next refresh: an interval over a quarter of the shorter lifetime lets them expire between
    two refreshes (or leaves no margin for a slow one), and every agent freezes on them."""
    lifetimes = {
        "timestamp_expiry_s": cfg.timestamp_expiry_s,
        "snapshot_expiry_s": cfg.snapshot_expiry_s,
    }
    key = min(lifetimes, key=lambda k: lifetimes[k])
    limit = lifetimes[key] / 4
    if cfg.refresh_interval_s > limit:
        raise InvalidRequestError(
            f"config: refresh_interval_s ({cfg.refresh_interval_s:g} s) must be at most a quarter "
            f"of {key} ({lifetimes[key]:g} s), or that metadata can expire between two "
            f"refreshes and freeze every agent: allowed 0 < refresh_interval_s <= {limit:g}; "
            f"lower refresh_interval_s or raise {key}"
        )


def _check_alerting(cfg: HubConfig) -> None:
    if cfg.alert_interval_s <= 0:
        raise InvalidRequestError(
            f"config: alert_interval_s must be > 0 (got {cfg.alert_interval_s:g}); e.g. 5"
        )
    if cfg.webhook_max_attempts < 1:
        raise InvalidRequestError(
            f"config: webhook_max_attempts must be >= 1 (got {cfg.webhook_max_attempts})"
        )
    for key in ("webhook_backoff_s", "webhook_backoff_max_s", "webhook_timeout_s"):
        if getattr(cfg, key) <= 0:
            raise InvalidRequestError(f"config: {key} must be > 0 (got {getattr(cfg, key):g})")
    if cfg.webhook_backoff_max_s < cfg.webhook_backoff_s:
        raise InvalidRequestError(
            "config: webhook_backoff_max_s must be >= webhook_backoff_s "
            f"({cfg.webhook_backoff_max_s:g} < {cfg.webhook_backoff_s:g})"
        )


def reload_hub_config(cfg: HubConfig) -> tuple[list[str], list[str]]:
    """Read cfg's sources again and apply what can change at run time (see RELOADABLE).

    Returns (applied keys, keys that changed but need a restart); raises if the config no
    longer loads, leaving the running one as it was.
    """
    if cfg.origin is None:
        raise InvalidRequestError("config: not loaded by load_hub_config, nothing to reload")
    fresh = load_hub_config(cfg.origin.path, dict(cfg.origin.overrides), cfg.origin.env)
    return apply_reloadable(cfg, fresh, RELOADABLE)
