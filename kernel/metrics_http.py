"""Prometheus /metrics over HTTP for the agent and the hub, and nothing else on that port.

prometheus_client's own server answers 200 with the metrics to every path, so a readiness probe
pointed at the metrics port by mistake (``/v2/health/ready``) would always pass. Here any other
path gets 404 and a line saying where health lives.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

METRICS_PATH = "/metrics"
NOT_FOUND = (
    b"404 not found: this port serves Prometheus metrics at /metrics only; health and inference "
    b"are on the inference ports (HTTP: /v2/health/live and /v2/health/ready)\n"
)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every few seconds would flood stderr.
        pass


def metrics_app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: the registry's exposition at /metrics, 404 everywhere else."""
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").rstrip("/") == METRICS_PATH:
            return exposition(environ, start_response)
        start_response(
            "404 Not Found",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(NOT_FOUND))),
            ],
        )
        return [NOT_FOUND]

    return app


def serve_metrics_http(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve ``registry`` on HOST:PORT from a daemon thread; returns the server (OSError if
    the address cannot be bound)."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
    server_cls = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    httpd: WSGIServer = make_server(
        host, port, metrics_app(registry), server_cls, handler_class=_QuietHandler
    )
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd
