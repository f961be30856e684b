"""Agent settings: one dataclass, loaded from TOML, then environment, then command line.

Every key is documented in docs/configuration.md; the defaults are the documented limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protos.errors import InvalidRequestError
from protos.settings import load_settings, split_hostport

ENV_PREFIX = "MODELFLEET_AGENT_"


@dataclass
class ServeConfig:
    # Local model repository: DIR/<name>/<version>/ bundles.
    models: Path = Path("models")
    # Open Inference Protocol gRPC endpoint.
    listen: str = "127.0.0.1:8001"
    # Prometheus /metrics over HTTP; empty disables it.
    metrics_listen: str = ""
    # Local admin API (status, rollback); empty means <models>/.modelfleet-admin.sock.
    admin_socket: str = ""
    # Seconds between repository scans.
    poll_interval_s: float = 1.0
    # Threads that run inference (onnxruntime releases the GIL while computing).
    serving_threads: int = 2
    # onnxruntime threads per session; 0 lets onnxruntime choose.
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # cpu, cuda or auto.
    device: str = "auto"
    # Dynamic batching for models whose bundle allows a batch dimension.
    batching: bool = True
    # Overrides the bundles' max_queue_delay_us when >= 0.
    max_queue_delay_us: int = -1
    # Batches computing at once per model version.
    batch_inflight: int = 1
    # gRPC message size limit, both directions.
    max_message_bytes: int = 64 * 1024 * 1024
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
    # grpc (everything over gRPC), mqtt (everything through the broker) or both (desired state
    # through the broker, bytes and reports over gRPC).
    transport: str = "grpc"
    # MQTT broker HOST:PORT (from enrollment when the hub has one).
    mqtt: str = ""

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
    """TOML file (``[agent]`` table or top level), then MODELFLEET_AGENT_* env, then overrides."""
    cfg = load_settings(
        ServeConfig, path, table="agent", env_prefix=ENV_PREFIX, overrides=overrides, env=env
    )
    validate(cfg)
    return cfg


def validate(cfg: ServeConfig) -> None:
    if cfg.device not in ("cpu", "cuda", "auto"):
        raise InvalidRequestError(f"config: device must be cpu, cuda or auto, not {cfg.device!r}")
    for name in ("serving_threads", "batch_inflight"):
        if getattr(cfg, name) < 1:
            raise InvalidRequestError(f"config: {name} must be >= 1")
    if cfg.max_message_bytes < 1024:
        raise InvalidRequestError("config: max_message_bytes must be at least 1024")
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
    split_hostport(cfg.listen, "listen")
    if cfg.metrics_listen:
        split_hostport(cfg.metrics_listen, "metrics_listen")
