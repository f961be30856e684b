"""sd_notify(3) for ``Type=notify`` services: readiness, status, reload, stop and watchdog.

Standard library only (no libsystemd binding to install): a notification is one datagram of
``KEY=VALUE`` lines sent to the unix socket that systemd names in ``$NOTIFY_SOCKET``. A name
starting with ``@`` is in Linux's abstract namespace. Without ``$NOTIFY_SOCKET`` (a shell, a
test, a container without systemd) every call is a no-op, so the agent and the hub call these
unconditionally.

The watchdog pings from an asyncio task, i.e. from the event loop that serves requests: if that
loop hangs (a blocking call, a deadlock), the pings stop and systemd restarts the service. A
thread would keep pinging for a dead loop, which is why there is none here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

# A notification is tiny and systemd reads its socket promptly; the bound only keeps a stuck
# receiver from stalling the event loop for long.
_SEND_TIMEOUT_S = 1.0


def socket_address(value: str) -> bytes | None:
    """``$NOTIFY_SOCKET`` -> an AF_UNIX address, or None for forms not supported here."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    # systemd 253+ also accepts vsock:CID:PORT (for VMs); nothing here runs that way.
    return None


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """The watchdog timeout in seconds from ``$WATCHDOG_USEC``, if it is meant for this process.

    ``$WATCHDOG_PID`` names the process systemd expects pings from; a child that inherited the
    environment must not ping on its parent's behalf (sd_watchdog_enabled(3)).
    """
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class Notifier:
    """One service's link to systemd; every method is safe to call without systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = socket_address(raw) if raw else None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket path: not notifying systemd", raw)
        self.watchdog_s = watchdog_interval(env)
        self._status: str | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; True when it was delivered."""
        if self.address is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(_SEND_TIMEOUT_S)
                sock.sendto(payload, self.address)
        except OSError as exc:
            # systemd being restarted, or a socket that went away: the service itself is fine,
            # so this is worth one warning, not a crash or a log line per ping.
            if not self._warned:
                log.warning("cannot notify systemd (%s): %s", os.fsdecode(self.address), exc)
                self._warned = True
            return False
        return True

    @staticmethod
    def _status_field(text: str) -> str:
        # STATUS= is one line: a newline would start a new (bogus) assignment.
        return "STATUS=" + " ".join(text.split())

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (or a reload) is complete and the service does its job."""
        fields = ["READY=1"]
        if status is not None:
            self._status = status
            fields.append(self._status_field(status))
        return self.send(*fields)

    def status(self, text: str) -> bool:
        """STATUS=, shown by ``systemctl status``; sent only when the text changes."""
        if text == self._status:
            return False
        self._status = text
        return self.send(self._status_field(text))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1, to be followed by :meth:`ready` once the new configuration applies.

        MONOTONIC_USEC (CLOCK_MONOTONIC, which is what time.monotonic reads on Linux) is what
        systemd 253+ requires with RELOADING=1 for ``Type=notify-reload``; older versions ignore
        it, so the same message works for ``Type=notify`` with ``ExecReload=kill -HUP``.
        """
        fields = ["RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}"]
        if status is not None:
            self._status = status
            fields.append(self._status_field(status))
        return self.send(*fields)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun (systemd then expects the process to exit)."""
        fields = ["STOPPING=1"]
        if status is not None:
            self._status = status
            fields.append(self._status_field(status))
        return self.send(*fields)

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping WATCHDOG=1 at half the watchdog timeout until cancelled (run it as a task).

        Half the timeout, as sd_watchdog_enabled(3) advises: one late wake-up of a busy loop
        must not cost a restart; a loop blocked for a whole timeout does.
        """
        if self.watchdog_s is None or self.address is None:
            return
        interval = self.watchdog_s / 2
        log.debug("systemd watchdog: %.3gs, pinging every %.3gs", self.watchdog_s, interval)
        while True:
            self.watchdog()
            await asyncio.sleep(interval)
