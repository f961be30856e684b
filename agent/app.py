"""Wires the agent together for ``modelfleet-agent serve`` and runs it until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from agent.config import ServeConfig
from agent.metrics import AgentMetrics
from agent.repository import RepositoryWatcher
from agent.runtime import RuntimeOptions
from agent.serving.dataplane import DataPlane
from agent.serving.grpc_server import (
    HealthReporter,
    ListenError,
    build_admin_server,
    build_server,
)
from agent.slots import BatchingConfig, SlotManager
from protos.settings import split_hostport

log = logging.getLogger("agent")


def build_slots(cfg: ServeConfig, metrics: AgentMetrics) -> SlotManager:
    return SlotManager(
        runtime=RuntimeOptions(cfg.intra_op_threads, cfg.inter_op_threads, cfg.device),
        batching=BatchingConfig(
            enabled=cfg.batching,
            max_queue_delay_us=cfg.max_queue_delay_us if cfg.max_queue_delay_us >= 0 else None,
            max_inflight=cfg.batch_inflight,
        ),
        metrics=metrics,
        serving_threads=cfg.serving_threads,
    )


async def serve(cfg: ServeConfig, stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    metrics = AgentMetrics()
    slots = build_slots(cfg, metrics)
    dataplane = DataPlane(slots, metrics)
    health = HealthReporter(slots)
    refresh_pending = False
    # Strong references: the event loop keeps only weak ones to tasks.
    background: set[asyncio.Task] = set()

    def on_change(_name: str) -> None:
        nonlocal refresh_pending
        if not refresh_pending:
            refresh_pending = True

            async def refresh() -> None:
                nonlocal refresh_pending
                refresh_pending = False
                await health.refresh()

            task = loop.create_task(refresh())
            background.add(task)
            task.add_done_callback(background.discard)

    slots.listeners.append(on_change)
    await health.refresh()

    server, port = build_server(slots, dataplane, health, cfg.listen, cfg.max_message_bytes)
    await server.start()
    admin_path = cfg.admin_socket_path()
    bound = f"{cfg.listen.rpartition(':')[0]}:{port}"
    admin = build_admin_server(slots, admin_path, bound)
    await admin.start()
    os.chmod(admin_path, 0o600)
    if cfg.metrics_listen:
        host, mport = split_hostport(cfg.metrics_listen, "metrics_listen")
        try:
            metrics.serve_http(host, mport)
        except OSError as exc:
            await server.stop(0)
            await admin.stop(0)
            admin_path.unlink(missing_ok=True)
            raise ListenError(f"cannot serve metrics on {cfg.metrics_listen}: {exc}") from None
        log.info("metrics on http://%s/metrics", cfg.metrics_listen)
    log.info("listening on %s (port %d); admin socket %s", cfg.listen, port, admin_path)

    if cfg.hub:
        from agent.fleet.sync import FleetSync

        source: Any = FleetSync(cfg, slots, bound)
        # Serve what was cached and verified before, whether or not the hub answers.
        await source.restore()
        mode = f"fleet mode, hub {cfg.hub}"
    else:
        source = RepositoryWatcher(cfg.models, slots, cfg.poll_interval_s)
        # Load what is on disk before declaring readiness; readiness means "can serve now".
        await source.sync_once()
        mode = f"standalone, repository {cfg.models}"
    await health.refresh()
    serving = [f"{s.name} v{s.active}" for s in slots.status() if s.active is not None]
    refused = [s.name for s in slots.status() if s.active is None]
    log.info("READY (%s): serving %s%s", mode, ", ".join(serving) or "nothing",
             f"; not ready: {', '.join(refused)}" if refused else "")  # fmt: skip
    watch_task = loop.create_task(source.run(stop))
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining in-flight requests (up to %gs)", cfg.drain_timeout_s)
        health.draining = True
        await health.refresh()
        await watch_task
        await server.stop(grace=cfg.drain_timeout_s)
        await admin.stop(grace=0)
        slots.close()
        with contextlib.suppress(FileNotFoundError):
            admin_path.unlink()
        log.info("stopped")
