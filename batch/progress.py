"""A progress line on stderr: rows, rows/s and, when the total is known, a bar and an ETA."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

ENV = "MODELFLEET_PROGRESS"


def wanted(stream: TextIO | None = None) -> bool:
    """On when stderr is a terminal, or when MODELFLEET_PROGRESS=1 (e.g. for CI logs)."""
    flag = os.environ.get(ENV, "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Called from the writer thread as units are written; redraws at most a few times a
    second on a terminal (in place) and every few seconds elsewhere (one line each)."""

    def __init__(
        self, total_rows: int | None, *, enabled: bool, stream: TextIO | None = None
    ) -> None:
        self.total = total_rows
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and self._isatty()
        self.interval = 0.2 if self.tty else 2.0
        self.rows = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def _isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def add(self, rows: int) -> None:
        self.rows += rows
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.rows / elapsed
        text = f"{self.rows:,} rows  {rate:,.0f} rows/s  elapsed {_duration(elapsed)}"
        if self.total:
            frac = min(self.rows / self.total, 1.0)
            filled = int(frac * 24)
            eta = (self.total - self.rows) / rate if rate > 0 else float("inf")
            eta_text = _duration(eta) if eta != float("inf") else "?"
            text = (
                f"[{'#' * filled}{'.' * (24 - filled)}] {frac:6.1%}  {self.rows:,}/"
                f"{self.total:,} rows  {rate:,.0f} rows/s  ETA {eta_text}"
            )
        return "scoring " + text

    def _draw(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line(now))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if not self.enabled:
            return
        self._draw(time.monotonic())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
