"""The broker's certificate revocation list: written where `mqtt-config` put the broker, reloaded.

`modelfleet-hub mqtt-config` records in ``DATA/mqtt/broker.json`` where the broker reads its CRL
(``crlfile``) and where it writes its pid (``pid_file``). The hub writes a new CRL there at
start, on every revocation and before the current one lapses, each time atomically (the broker
never reads half a file), then sends the broker SIGHUP, on which Mosquitto reads its
configuration again, CRL included. See docs/mqtt.md.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from modelfleet.hub.ca import CertificateAuthority
from modelfleet.hub.registry import Registry
from modelfleet.kernel.atomic import atomic_write

log = logging.getLogger(__name__)

BROKER_FILE = "broker.json"
CRL_FILE = "crl.pem"
PID_FILE = "mosquitto.pid"


@dataclass(frozen=True)
class BrokerFiles:
    crl: Path
    pid: Path

    @classmethod
    def load(cls, mqtt_dir: Path) -> BrokerFiles | None:
        """Where `mqtt-config` put the broker's files; None if it was never run here."""
        try:
            raw = json.loads((mqtt_dir / BROKER_FILE).read_text())
            return cls(Path(raw["crl_file"]), Path(raw["pid_file"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.error(
                "%s is unreadable (%s): run `modelfleet-hub mqtt-config` again, or the "
                "broker's CRL is not kept up to date",
                mqtt_dir / BROKER_FILE,
                exc,
            )
            return None

    def save(self, mqtt_dir: Path) -> None:
        mqtt_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        body = {"crl_file": str(self.crl), "pid_file": str(self.pid)}
        atomic_write(mqtt_dir / BROKER_FILE, json.dumps(body, indent=2).encode(), mode=0o600)


def write_crl(ca: CertificateAuthority, registry: Registry, path: Path, lifetime_s: float) -> int:
    """Issue the CRL of every unexpired certificate of a revoked agent into ``path``."""
    revoked = registry.revoked_certificates(time.time())
    # 0644: the broker may run as another user; a CRL is public by nature.
    atomic_write(path, ca.issue_crl(revoked, lifetime_s), mode=0o644)
    return len(revoked)


def reload_broker(pid_file: Path) -> str:
    """SIGHUP to the Mosquitto named by ``pid_file``; returns what happened, for the log.

    The pid is checked to be a running ``mosquitto`` first: a stale pid file may name a pid
    that now belongs to some other process, which must not get a signal meant for the broker.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return f"no broker pid in {pid_file}"
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid {pid} from {pid_file} is not running"
    if not comm.startswith("mosquitto"):
        return f"pid {pid} from {pid_file} is {comm!r}, not mosquitto"
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return f"cannot signal the broker (pid {pid}): {exc.strerror}"
    return f"broker (pid {pid}) reloaded"


class CrlPublisher:
    """Keeps the broker's CRL current: now, on every revocation, and before it lapses."""

    def __init__(
        self, ca: CertificateAuthority, registry: Registry, mqtt_dir: Path, lifetime_s: float
    ) -> None:
        self.ca = ca
        self.registry = registry
        self.mqtt_dir = mqtt_dir
        self.lifetime_s = lifetime_s
        # Monotonic time after which the CRL is issued again: half its lifetime, so a hub
        # that cannot write it for a while still has the other half before the broker refuses.
        self.due = 0.0

    def publish(self, *, force: bool = True) -> bool:
        """Write a new CRL and reload the broker; False when there is no broker to keep."""
        if not force and time.monotonic() < self.due:
            return False
        files = BrokerFiles.load(self.mqtt_dir)
        if files is None:
            return False
        count = write_crl(self.ca, self.registry, files.crl, self.lifetime_s)
        self.due = time.monotonic() + self.lifetime_s / 2
        how = reload_broker(files.pid)
        level = logging.INFO if how.endswith("reloaded") else logging.WARNING
        log.log(
            level,
            "wrote the broker's CRL %s (%d revoked certificate(s), valid %gs): %s%s",
            files.crl,
            count,
            self.lifetime_s,
            how,
            ""
            if level == logging.INFO
            else "; the broker reads the new CRL when it next starts or reloads (docs/mqtt.md)",
        )
        return True


__all__ = [
    "BROKER_FILE",
    "CRL_FILE",
    "PID_FILE",
    "BrokerFiles",
    "CrlPublisher",
    "reload_broker",
    "write_crl",
]
