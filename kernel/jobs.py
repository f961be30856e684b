"""Scheduled batch jobs as hub and agent both know them: the spec the hub sends in desired
state, and the run an agent reports back.

Both are also stored as JSON (the hub's registry, the agent's desired.json): ``to_record`` and
``from_record`` are that format, named fields read one by one, so a record written by an older
release (missing fields, or int64 values as strings, as protobuf's JSON mapping writes them)
still reads, and a field renamed in code cannot silently read nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


def _int(record: Mapping[str, Any], key: str) -> int:
    return int(record.get(key) or 0)


def _float(record: Mapping[str, Any], key: str) -> float:
    return float(record.get(key) or 0.0)


def _str(record: Mapping[str, Any], key: str) -> str:
    return str(record.get(key) or "")


@dataclass(frozen=True)
class JobSpec:
    name: str
    model: str
    # 0: whatever version is deployed (active) on the agent when the job fires.
    version: int
    # A crontab line, or "every <seconds>s" for short intervals.
    schedule: str
    # Parquet file, folder or glob, and the output folder, as seen on the agent.
    input: str
    output: str
    sql: str = ""
    paused: bool = False
    # Bumped by `modelfleet-hub jobs run-now`: a new value means "run once now".
    run_now: int = 0
    # Input columns copied to the output beside the scores (e.g. ids), comma-separated.
    keys: str = ""

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> JobSpec:
        return cls(
            name=_str(record, "name"),
            model=_str(record, "model"),
            version=_int(record, "version"),
            schedule=_str(record, "schedule"),
            input=_str(record, "input"),
            output=_str(record, "output"),
            sql=_str(record, "sql"),
            paused=bool(record.get("paused", False)),
            run_now=_int(record, "run_now"),
            keys=_str(record, "keys"),
        )


@dataclass
class JobRun:
    job: str
    run_id: str
    model: str
    version: int
    status: str  # succeeded | failed
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    duration_s: float = 0.0
    error: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    # Set by the hub from the reporting agent's identity, never taken from the report.
    agent_id: str = ""

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> JobRun:
        return cls(
            job=_str(record, "job"),
            run_id=_str(record, "run_id"),
            model=_str(record, "model"),
            version=_int(record, "version"),
            status=_str(record, "status"),
            rows_in=_int(record, "rows_in"),
            rows_out=_int(record, "rows_out"),
            rows_rejected=_int(record, "rows_rejected"),
            duration_s=_float(record, "duration_s"),
            error=_str(record, "error"),
            started_at=_float(record, "started_at"),
            finished_at=_float(record, "finished_at"),
            agent_id=_str(record, "agent_id"),
        )
