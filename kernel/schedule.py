"""Job schedules, parsed the same way by the hub (to refuse bad ones) and the agents."""

from __future__ import annotations

from typing import Any

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from modelfleet.kernel.errors import InvalidRequestError


def trigger_for(schedule: str) -> Any:
    """A crontab line ("0 2 * * *"), or "every <seconds>s" for short intervals."""
    text = schedule.strip()
    if text.startswith("every "):
        seconds = text[len("every ") :].rstrip("s")
        try:
            value = float(seconds)
        except ValueError:
            raise InvalidRequestError(f"invalid schedule {schedule!r}") from None
        if value <= 0:
            raise InvalidRequestError(f"invalid schedule {schedule!r}: interval must be > 0")
        return IntervalTrigger(seconds=value)
    try:
        return CronTrigger.from_crontab(text)
    except ValueError as exc:
        raise InvalidRequestError(f"invalid cron schedule {schedule!r}: {exc}") from None
