"""Can this process listen there? Asked before a server writes any state, so a busy port stops
it with one line and leaves nothing behind (a hub would otherwise create its CA and keys first:
gRPC needs the TLS material before it binds).

The answer can go stale before the real bind (another process may take the port in between):
servers still handle a failing bind, this only makes the common case clean.
"""

from __future__ import annotations

import errno
import socket

from modelfleet.kernel.errors import ListenError
from modelfleet.kernel.settings import split_hostport


def check_listen(address: str, what: str, fix: str) -> None:
    """Raise :class:`ListenError` if HOST:PORT ``address`` cannot be bound now.

    ``what`` names the port for the message ("the hub's mTLS port (listen)"), ``fix`` says how
    to choose another ("set another port with --listen"). Port 0 (any free port) always passes.
    """
    host, port = split_hostport(address, what)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(
            f"cannot listen on {address} for {what}: {host!r} does not resolve ({exc.strerror}); "
            f"{fix}"
        ) from None
    unusable: list[str] = []
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            # As gRPC and http.server bind: a port whose last user is in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ListenError(
                        f"cannot listen on {address} for {what}: port {port} is in use by "
                        f"another process (`ss -ltnp 'sport = :{port}'` shows which); stop it, "
                        f"or {fix}"
                    ) from None
                if exc.errno == errno.EACCES:
                    raise ListenError(
                        f"cannot listen on {address} for {what}: port {port} needs privileges "
                        f"(below 1024); {fix}"
                    ) from None
                # e.g. ::1 for "localhost" on a host without IPv6: the others may do.
                unusable.append(f"{sockaddr[0]}: {exc.strerror}")
    if unusable and len(unusable) == len(infos):
        raise ListenError(
            f"cannot listen on {address} for {what}: {'; '.join(unusable)} (is {host!r} an "
            f"address of this machine?); {fix}"
        )
