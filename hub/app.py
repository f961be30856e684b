"""Wires the hub together for ``modelfleet-hub serve`` and runs it until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc

from hub.config import HubConfig
from hub.core import HubCore
from hub.server import AdminServicer, FleetServicer, dump_json, server_options
from protos import fleet_pb2_grpc as pb_grpc
from protos.identity import generate_key, write_pem, write_private_key

log = logging.getLogger("hub")


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


def ensure_admin_identity(core: HubCore) -> None:
    if not (core.paths.admin / "admin.crt").exists():
        core.ca.issue_admin(core.paths.admin)
        log.info("admin identity written to %s", core.paths.admin)


async def serve(cfg: HubConfig, stop: asyncio.Event | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    core = HubCore(cfg)
    ensure_admin_identity(core)
    key_pem, chain_pem, ca_pem = tls_material(core)
    server = grpc.aio.server(options=server_options(cfg.max_message_bytes))
    pb_grpc.add_FleetServicer_to_server(FleetServicer(core), server)
    pb_grpc.add_HubAdminServicer_to_server(AdminServicer(core), server)
    mtls = grpc.ssl_server_credentials(
        [(key_pem, chain_pem)], root_certificates=ca_pem, require_client_auth=True
    )
    # Enrollment: the node has no certificate yet; the one-time token authorises it. Every
    # other method checks for a client identity and so refuses callers on this port.
    server_auth_only = grpc.ssl_server_credentials([(key_pem, chain_pem)])
    port = server.add_secure_port(cfg.listen, mtls)
    enroll_port = server.add_secure_port(cfg.enroll_address(), server_auth_only)
    if not port or not enroll_port:
        raise OSError(f"cannot listen on {cfg.listen} / {cfg.enroll_address()}")
    core.advertise = cfg.advertised(port)
    core.advertise_enroll = cfg.advertised_enroll(enroll_port)
    await server.start()
    dump_json(core.paths.admin / "hub.json",
              {"address": core.advertise, "enroll_address": core.advertise_enroll})  # fmt: skip
    core.refresh_signatures()
    log.info("READY: hub on %s (enrollment %s), data %s", core.advertise, core.advertise_enroll,
             cfg.data)  # fmt: skip

    async def refresher() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), cfg.refresh_interval_s)
            try:
                if core.refresh_signatures():
                    log.info("re-signed timestamp/snapshot metadata")
            except Exception:
                log.exception("refreshing TUF metadata failed; will retry")

    tasks = [loop.create_task(refresher()), loop.create_task(core.rollouts.run(stop))]
    bridge = None
    if cfg.mqtt:
        from hub.mqtt import MqttBridge

        bridge = MqttBridge(core, cfg.mqtt, loop)
        bridge.start()
        tasks.append(loop.create_task(bridge.run(stop)))
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop(grace=5)
        await asyncio.gather(*tasks)
        if bridge is not None:
            bridge.stop()
        core.registry.close()
        log.info("stopped")
