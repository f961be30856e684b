"""Ships complete capture files to the hub, resumably, off the serving path.

Each look lists the complete files (oldest first), asks the hub how much of each it holds
(``capture_offset``), sends the rest (``upload_capture``) and deletes the local file once the hub
says it stored the whole of it. The hub keys files by (agent, file id) and stores each once, so a
crash between its acknowledgement and the local delete costs one extra offset call, never a
duplicate. Over MQTT the upload is a series of bounded chunk messages (agent/fleet/mqtt_plane.py)
that the hub stores only where each continues what it holds; the shipper cannot tell the two
apart (docs/monitoring.md#inference-capture).

A file the hub refuses for good (its message starts with ``CAPTURE_REFUSED``: a model never
deployed to this agent) is deleted, counted (``modelfleet_capture_files_total{event="refused"}``)
and logged with the hub's reason, and shipping goes on with the next: otherwise one such file,
oldest first, would hold back every later one. Anything else (hub unreachable, quota reached,
the agent itself refused) is retried with backoff and keeps the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path

from modelfleet.agent.fleet.backoff import Backoff
from modelfleet.agent.fleet.controlplane import (
    CaptureFileInfo,
    ControlPlane,
)
from modelfleet.agent.serving.capture import SUFFIX, Capture
from modelfleet.kernel.errors import CAPTURE_REFUSED, ModelfleetError, Status

log = logging.getLogger(__name__)


def file_info(path: Path) -> CaptureFileInfo:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return CaptureFileInfo(path.parent.name, path.name[: -len(SUFFIX)], size, digest.hexdigest())


def refused_for_good(exc: ModelfleetError) -> bool:
    """The hub will never take this file (its other files may still go)."""
    return exc.status is Status.PERMISSION_DENIED and CAPTURE_REFUSED in str(exc)


class CaptureShipper:
    def __init__(
        self,
        capture: Capture,
        control: ControlPlane,
        interval_s: float,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.capture = capture
        self.control = control
        self.interval_s = interval_s
        self.backoff_max_s = backoff_max_s
        self.shipped = 0
        self.refused = 0

    async def ship_once(self) -> int:
        """Ship every complete file there is now; returns how many the hub stored."""
        stored_now = 0
        for path in await asyncio.to_thread(self.capture.files):
            try:
                info = await asyncio.to_thread(file_info, path)
            except FileNotFoundError:
                continue  # the quota took it meanwhile
            try:
                stored_now += await self._ship(path, info)
            except ModelfleetError as exc:
                if not refused_for_good(exc):
                    raise
                path.unlink(missing_ok=True)
                self.capture.metrics.capture_files.labels(info.model, "refused").inc()
                self.refused += 1
                log.warning("capture file %s/%s deleted unshipped: %s", info.model, path.name, exc)
        return stored_now

    async def _ship(self, path: Path, info: CaptureFileInfo) -> int:
        have, stored = await self.control.capture_offset(info)
        if not stored:
            # More than the file: the hub holds another file under this id; start over.
            start = have if 0 <= have <= info.size else 0
            if start:
                log.info(
                    "resuming the upload of capture file %s/%s at byte %d of %d",
                    info.model,
                    path.name,
                    start,
                    info.size,
                )
            have, stored = await self.control.upload_capture(info, path, start)
        if not stored:
            raise OSError(
                f"the hub holds {have} of {info.size} bytes of capture file {path.name} "
                "after the upload; retrying"
            )
        path.unlink(missing_ok=True)
        self.capture.metrics.capture_files.labels(info.model, "shipped").inc()
        self.shipped += 1
        return 1

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base=self.interval_s, cap=max(self.backoff_max_s, self.interval_s))
        while not stop.is_set():
            delay = self.interval_s
            try:
                await self.ship_once()
                backoff.reset()
            except (OSError, ModelfleetError) as exc:
                delay = backoff.next()
                log.warning("capture shipping: %s; retrying in %.1fs", exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)


__all__ = ["CaptureShipper", "file_info", "refused_for_good"]
