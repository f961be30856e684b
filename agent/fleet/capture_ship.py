"""Ships complete capture files to the hub, resumably, off the serving path.

Each look lists the complete files (oldest first), asks the hub how much of each it holds
(``capture_offset``), sends the rest (``upload_capture``) and deletes the local file once the hub
says it stored the whole of it. The hub keys files by (agent, file id) and stores each once, so a
crash between its acknowledgement and the local delete costs one extra offset call, never a
duplicate. Over MQTT the upload is a series of bounded chunk messages (agent/fleet/mqtt_plane.py)
that the hub stores only where each continues what it holds; the shipper cannot tell the two
apart (docs/monitoring.md#inference-capture).
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
from modelfleet.kernel.errors import ModelfleetError

log = logging.getLogger(__name__)


def file_info(path: Path) -> CaptureFileInfo:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return CaptureFileInfo(path.parent.name, path.name[: -len(SUFFIX)], size, digest.hexdigest())


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

    async def ship_once(self) -> int:
        """Ship every complete file there is now; returns how many the hub stored."""
        stored_now = 0
        for path in await asyncio.to_thread(self.capture.files):
            try:
                info = await asyncio.to_thread(file_info, path)
            except FileNotFoundError:
                continue  # the quota took it meanwhile
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
            stored_now += 1
            self.shipped += 1
        return stored_now

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


__all__ = ["CaptureShipper", "file_info"]
