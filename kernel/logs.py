"""Logging set-up: journald-friendly text, or one JSON object per line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

# Loggers are named after modules (``modelfleet.agent.slots``); lines show the name without the
# namespace (``agent.slots``): shorter, and the same as before the packages moved under it.
_NAMESPACE = "modelfleet."


def _short_name(record: logging.LogRecord) -> str:
    return record.name.removeprefix(_NAMESPACE)


class _ShortName(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.short_name = _short_name(record)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": _short_name(record),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


_SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``: journald reads the priority prefix and adds the time."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelname, 6)
        text = f"<{prio}>{_short_name(record)}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JournalJsonFormatter(JsonFormatter):
    """JSON lines with journald's ``<priority>`` prefix: journald strips it and keeps the level,
    so the journal holds plain JSON messages with the right priority."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>{super().format(record)}"


def stderr_is_journal(stream: object = None) -> bool:
    """True when stderr is connected to journald itself.

    ``$JOURNAL_STREAM`` is ``DEVICE:INODE`` of the journal stream systemd connected; it is also
    inherited by anything started from a service, so it only counts when stderr really is that
    stream (the check sd_journal_stream_fd(3) recommends), not e.g. a file it was redirected to.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())  # type: ignore[union-attr]
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """(Re)configure the root logger; called again on SIGHUP when log_level/log_json change."""
    handler = logging.StreamHandler(sys.stderr)
    journal = stderr_is_journal()
    if json_lines:
        handler.setFormatter(JournalJsonFormatter() if journal else JsonFormatter())
    elif journal:
        # journald stamps every line itself; a second timestamp is noise.
        handler.setFormatter(JournalFormatter())
    else:
        fmt = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(short_name)s: %(message)s",
            "%Y-%m-%dT%H:%M:%S",
        )
        fmt.converter = time.gmtime
        handler.setFormatter(fmt)
        handler.addFilter(_ShortName())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def reload_logged(
    cfg: Any,
    reload_config: Callable[[Any], tuple[list[str], list[str]]],
    reloadable: Iterable[str],
    log: logging.Logger,
    on_applied: Callable[[list[str]], None] = lambda applied: None,
) -> None:
    """SIGHUP's common part for hub and agent: reload ``cfg`` in place and say what changed.

    ``reload_config(cfg)`` returns (settings applied now, settings that need a restart). A bad
    edit is logged and the running configuration kept: a reload must not take a server down.
    """
    where = cfg.origin.path if cfg.origin and cfg.origin.path else "(no config file)"
    log.info("SIGHUP: reloading configuration from %s", where)
    try:
        old = {k: getattr(cfg, k) for k in reloadable}
        applied, restart = reload_config(cfg)
        if "log_level" in applied or "log_json" in applied:
            setup_logging(cfg.log_level, cfg.log_json)
        on_applied(applied)
        changes = ", ".join(f"{k} {old[k]!r} -> {getattr(cfg, k)!r}" for k in applied)
        log.info("configuration reloaded: %s", changes or "no run-time setting changed")
        if restart:
            log.warning("configuration changed, needs a restart: %s", ", ".join(restart))
    except Exception as exc:
        log.error("configuration reload failed, keeping the running configuration: %s", exc)
