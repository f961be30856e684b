"""The run folder: part files, the checkpoint, the atomic commit.

Layout while a run is in progress (``DIR`` is ``--output``)::

    DIR/.run-<run_id>/
        _lock                   flock()ed by the process writing the run
        _checkpoint.jsonl       line 1: header (fingerprint); then one line per committed unit
        part-00000.parquet      committed units
        part-00001.parquet.tmp  the unit being written (deleted on resume)
        _rejected/part-00001.parquet   rejected rows of a unit (--on-error skip)

and once every unit is committed::

    DIR/run-<run_id>/
        _SUCCESS                JSON summary
        part-00000.parquet ...
    DIR/rejected-<run_id>.parquet   (only when rows were rejected)

A unit is committed by renaming its finished part file into place and then appending its line
to the checkpoint (both fsynced). A crash between the two leaves a part the checkpoint does not
list; resume deletes it and scores the unit again, so every unit is in the output exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from modelfleet.kernel.atomic import atomic_write_json, try_lock
from modelfleet.kernel.atomic import fsync_dir as _fsync_dir
from modelfleet.kernel.errors import ModelfleetError, Status

CHECKPOINT_FILE = "_checkpoint.jsonl"
LOCK_FILE = "_lock"
SUCCESS_FILE = "_SUCCESS"
REJECTED_DIR = "_rejected"
DUCKDB_TMP_DIR = "_duckdb_tmp"
CHECKPOINT_FORMAT = 1


class RunConflictError(ModelfleetError):
    """The run id names a run that cannot be resumed as asked (other input, other model, or a
    process still writing it)."""

    status = Status.FAILED_PRECONDITION
    reason = "run_conflict"


def part_name(unit: int) -> str:
    return f"part-{unit:05d}.parquet"


@dataclass(frozen=True)
class UnitRecord:
    unit: int
    part: str
    rows_in: int
    rows_out: int
    rows_rejected: int
    rejected_part: str | None


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


class RunDir:
    """One run's folders. Not thread-safe: the engine's writer thread is its only user while
    the run is in progress."""

    def __init__(self, output: Path, run_id: str) -> None:
        self.output = output
        self.run_id = run_id
        self.work = output / f".run-{run_id}"
        self.final = output / f"run-{run_id}"
        self.rejected_path = output / f"rejected-{run_id}.parquet"
        self._lock_fd: int | None = None
        self._checkpoint: Any = None

    # -- completed runs -----------------------------------------------------------------------

    def completed_summary(self) -> dict[str, Any] | None:
        """The ``_SUCCESS`` summary of an already committed run, else None."""
        marker = self.final / SUCCESS_FILE
        if not self.final.exists():
            return None
        try:
            summary = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            raise RunConflictError(
                f"{self.final} exists but has no readable {SUCCESS_FILE}; it was not written by "
                "a complete run: move it away or pick another --run-id"
            ) from None
        self._remove_helpers(self.final)  # a crash right after the commit rename leaves these
        return summary

    # -- opening (fresh or resumed) -----------------------------------------------------------

    def open(self, header: dict[str, Any]) -> dict[int, UnitRecord]:
        """Lock the work folder and return the units an earlier attempt committed.

        Raises :class:`RunConflictError` when another process holds the run or when the
        checkpoint was written for other inputs (its fingerprint differs).
        """
        self.output.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(exist_ok=True)
        fd = try_lock(self.work / LOCK_FILE)
        if fd is None:
            raise RunConflictError(
                f"run {self.run_id} is being written by another process (lock on "
                f"{self.work / LOCK_FILE})"
            )
        self._lock_fd = fd
        done = self._read_checkpoint(header)
        self._clean(done)
        self._checkpoint = open(self.work / CHECKPOINT_FILE, "a")  # noqa: SIM115 (kept open)
        return done

    def _read_checkpoint(self, header: dict[str, Any]) -> dict[int, UnitRecord]:
        path = self.work / CHECKPOINT_FILE
        lines = path.read_text().splitlines() if path.exists() else []
        if not lines:
            self._write_header(header)
            return {}
        try:
            stored = json.loads(lines[0])
        except json.JSONDecodeError:
            stored = {}
        if stored.get("fingerprint") != header["fingerprint"]:
            raise RunConflictError(
                f"run {self.run_id} was started with other inputs: "
                f"{_differences(stored.get('details', {}), header['details'])}; resume it with "
                "the same model, input, --sql, --features, --keys, --batch-rows and --unit-rows, "
                "or use a new --run-id"
            )
        done: dict[int, UnitRecord] = {}
        for line in lines[1:]:
            try:
                record = UnitRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                break  # a torn last line: the unit it describes is redone
            if (self.work / record.part).exists():
                done[record.unit] = record
        return done

    def _write_header(self, header: dict[str, Any]) -> None:
        # mode=None: the umask decides, as for the parquet files beside it.
        atomic_write_json(
            self.work / CHECKPOINT_FILE, {"format": CHECKPOINT_FORMAT, **header}, mode=None
        )

    def restart(self, header: dict[str, Any]) -> None:
        """Forget every committed unit (a run whose units cannot be reproduced)."""
        if self._checkpoint is not None:
            self._checkpoint.close()
        self._write_header(header)
        self._clean({})
        self._checkpoint = open(self.work / CHECKPOINT_FILE, "a")  # noqa: SIM115

    def _clean(self, done: dict[int, UnitRecord]) -> None:
        """Delete what no committed unit owns: partial parts from the attempt that died."""
        keep = {r.part for r in done.values()}
        keep_rejected = {r.rejected_part for r in done.values() if r.rejected_part}
        for path in self.work.iterdir():
            if path.name.startswith("part-") and path.name not in keep:
                path.unlink()
        rejected = self.work / REJECTED_DIR
        if rejected.exists():
            for path in rejected.iterdir():
                if path.name not in keep_rejected:
                    path.unlink()
        shutil.rmtree(self.work / DUCKDB_TMP_DIR, ignore_errors=True)

    # -- units --------------------------------------------------------------------------------

    def part_tmp(self, unit: int) -> Path:
        return self.work / f"{part_name(unit)}.tmp"

    def rejected_tmp(self, unit: int) -> Path:
        (self.work / REJECTED_DIR).mkdir(exist_ok=True)
        return self.work / REJECTED_DIR / f"{part_name(unit)}.tmp"

    def commit_unit(self, record: UnitRecord) -> None:
        """Make a finished unit durable: rejected part, then part, then the checkpoint line."""
        if record.rejected_part:
            tmp = self.rejected_tmp(record.unit)
            _fsync_file(tmp)
            os.replace(tmp, self.work / REJECTED_DIR / record.rejected_part)
        tmp = self.part_tmp(record.unit)
        _fsync_file(tmp)
        os.replace(tmp, self.work / record.part)
        _fsync_dir(self.work)
        self._checkpoint.write(json.dumps(asdict(record)) + "\n")
        self._checkpoint.flush()
        os.fsync(self._checkpoint.fileno())

    # -- the commit ---------------------------------------------------------------------------

    def finish(self, records: Iterable[UnitRecord], summary: dict[str, Any]) -> None:
        """Publish the run: rejected rows file, ``_SUCCESS``, then one rename of the folder."""
        rejected_parts = [
            self.work / REJECTED_DIR / r.rejected_part
            for r in sorted(records, key=lambda r: r.unit)
            if r.rejected_part
        ]
        if rejected_parts:
            _merge_parquet(rejected_parts, self.rejected_path)
        marker = self.work / SUCCESS_FILE
        marker.write_text(json.dumps(summary, indent=2) + "\n")
        _fsync_file(marker)
        _fsync_dir(self.work)
        os.rename(self.work, self.final)
        _fsync_dir(self.output)
        self._remove_helpers(self.final)

    def _remove_helpers(self, folder: Path) -> None:
        for name in (CHECKPOINT_FILE, LOCK_FILE):
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
        for name in (REJECTED_DIR, DUCKDB_TMP_DIR):
            shutil.rmtree(folder / name, ignore_errors=True)

    def close(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint.close()
            self._checkpoint = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _merge_parquet(parts: list[Path], dest: Path) -> None:
    """Concatenate part files into ``dest`` atomically, one row group at a time."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    writer: pq.ParquetWriter | None = None
    try:
        for part in parts:
            pf = pq.ParquetFile(part)
            for rg in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(rg)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
        if writer is None:
            writer = pq.ParquetWriter(tmp, pq.read_schema(parts[0]))
    finally:
        if writer is not None:
            writer.close()
    _fsync_file(tmp)
    os.replace(tmp, dest)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "changed: " + (", ".join(changed) if changed else "unknown (unreadable checkpoint)")
