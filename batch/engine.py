"""Batch scoring as a library: ``score(ScoreConfig(...)) -> ScoreSummary``.

The CLI (``batch/cli.py``) is a thin edge over this module, and the agent can call
:func:`score` in-process (scheduled jobs): nothing here prints except the optional progress
line, and every failure is a :mod:`kernel.errors` type.

The pipeline overlaps the three costs of a run on separate threads joined by bounded queues::

    reader thread   Parquet / DuckDB -> record batches -> column checks -> numpy tensors
         | queue (queue_depth batches)
    calling thread  onnxruntime session.run (releases the GIL; --threads intra-op threads)
         | queue (queue_depth batches)
    writer thread   Arrow columns -> part-NNNNN.parquet -> commit unit -> checkpoint

Memory is bounded by the queue depths times the batch size (plus one row group's compressed
bytes in the Parquet reader), whatever the input size.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from modelfleet.batch import source as src
from modelfleet.batch.checkpoint import (
    DUCKDB_TMP_DIR,
    RunConflictError,
    RunDir,
    UnitRecord,
    part_name,
)
from modelfleet.batch.mapping import (
    META_COLUMNS,
    Extracted,
    InputBinding,
    OutputBinding,
    bind_inputs,
    bind_outputs,
    extract,
    output_schema,
    rejected_schema,
)
from modelfleet.batch.progress import Progress, wanted
from modelfleet.kernel.bundle import Bundle, load_bundle
from modelfleet.kernel.errors import InvalidRequestError, ModelfleetError
from modelfleet.kernel.runtime import OnnxModel, RuntimeOptions

log = logging.getLogger(__name__)

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
ON_ERROR = ("fail", "skip")
DEFAULT_BATCH_ROWS = 16_384
DEFAULT_UNIT_ROWS = 1_048_576
# Output rows are buffered into row groups of about this size (before encoding).
ROW_GROUP_BYTES = 32 << 20

__all__ = ["RunConflictError", "ScoreConfig", "ScoreSummary", "new_run_id", "score"]


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring job. Paths may be ``str`` or ``Path``."""

    model: Path | str
    """Bundle directory (``<name>/<version>/``), verified as the agent does."""
    input: str
    """A Parquet file, a folder (recursive) or a glob."""
    output: Path | str
    """Folder receiving ``run-<run_id>/`` and ``rejected-<run_id>.parquet``."""
    sql: str | None = None
    """DuckDB SELECT over the view ``input``; resuming needs a top-level ORDER BY."""
    batch_rows: int = DEFAULT_BATCH_ROWS
    """Rows per record batch and per onnxruntime call."""
    unit_rows: int = DEFAULT_UNIT_ROWS
    """Checkpoint grain: rows per unit for --sql (rounded up to whole batches); for files, the
    fewest rows before a unit is cut at a row-group boundary."""
    threads: int = 0
    """Cores onnxruntime may use: at most this many model calls run at once, each on one
    intra-op thread (also DuckDB's thread cap). 0: one per available core."""
    features: tuple[str, ...] | None = None
    """Scalar feature columns for the model's one [batch, F] input, in order."""
    keys: tuple[str, ...] = ()
    """Columns copied unchanged from the input to the output (e.g. ids)."""
    on_error: str = "fail"
    """``fail``: bad data raises InvalidRequestError; ``skip``: bad rows go to the rejected file."""
    run_id: str | None = None
    """Names the run; an existing unfinished run with this id is resumed. None: a new id."""
    progress: bool | None = None
    """Progress line on stderr; None: when stderr is a TTY or MODELFLEET_PROGRESS=1."""
    device: str = "auto"
    queue_depth: int = 2
    """Batches buffered between reader, scorer and writer (each way)."""
    duckdb_memory_limit: str = "1GB"
    """DuckDB's memory cap for --sql queries that must see all rows (sorts, joins); it spills
    to the run folder beyond it."""
    verify_hashes: bool = True

    def validate(self) -> None:
        if self.batch_rows < 1:
            raise InvalidRequestError(f"--batch-rows must be >= 1, got {self.batch_rows}")
        if self.unit_rows < 1:
            raise InvalidRequestError(f"--unit-rows must be >= 1, got {self.unit_rows}")
        if self.threads < 0:
            raise InvalidRequestError(f"--threads must be >= 0, got {self.threads}")
        if self.queue_depth < 1:
            raise InvalidRequestError(f"queue_depth must be >= 1, got {self.queue_depth}")
        if self.on_error not in ON_ERROR:
            raise InvalidRequestError(
                f"--on-error must be one of {', '.join(ON_ERROR)}, got {self.on_error!r}"
            )
        if self.run_id is not None and not RUN_ID_RE.match(self.run_id):
            raise InvalidRequestError(
                f"invalid --run-id {self.run_id!r}: use 1-128 letters, digits, '_', '.', '-'"
            )
        if len(set(self.keys)) != len(self.keys):
            raise InvalidRequestError(f"--keys repeats a column: {list(self.keys)}")
        if self.sql is not None and not self.sql.strip():
            raise InvalidRequestError("--sql is empty")

    @property
    def sql_unit_rows(self) -> int:
        # Whole batches per unit, so a batch never straddles two part files.
        return math.ceil(self.unit_rows / self.batch_rows) * self.batch_rows


@dataclass(frozen=True)
class ScoreSummary:
    run_id: str
    output_path: str
    """``DIR/run-<run_id>``: the committed part files and ``_SUCCESS``."""
    rejected_path: str | None
    """``DIR/rejected-<run_id>.parquet`` when rows were rejected, else None."""
    model_name: str
    model_version: int
    rows_in: int
    """Rows read from the input (after --sql), over every attempt of the run."""
    rows_out: int
    rows_rejected: int
    parts: int
    units_resumed: int
    """Units committed by an earlier, interrupted attempt and skipped by this one."""
    duration_s: float
    """This attempt's wall time."""
    rows_per_s: float
    """Rows this attempt read and scored, per second of its wall time."""
    resumed: bool = False
    already_complete: bool = False
    """The run was committed before this call: nothing was done, the stored summary is returned."""
    restarted: bool = False
    """A --sql run without ORDER BY cannot resume: its earlier units were discarded and redone."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        state = " (already complete)" if self.already_complete else ""
        resumed = f", {self.units_resumed} units resumed" if self.units_resumed else ""
        return (
            f"run {self.run_id}{state}: {self.rows_in:,} rows in, {self.rows_out:,} out, "
            f"{self.rows_rejected:,} rejected, {self.parts} parts{resumed}; "
            f"{self.duration_s:.2f} s, {self.rows_per_s:,.0f} rows/s -> {self.output_path}"
        )


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def new_run_id() -> str:
    """Sortable and unique: UTC start time plus a random suffix."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------------------------
# The run


def score(config: ScoreConfig) -> ScoreSummary:
    """Score ``config.input`` with the bundle into ``config.output``; see the module docstring.

    Raises :class:`kernel.errors.InvalidRequestError` (bad arguments or, with
    ``on_error="fail"``, bad data), :class:`kernel.errors.BundleError`,
    :class:`kernel.errors.InferenceError` and :class:`RunConflictError`.
    """
    config.validate()
    started = time.monotonic()
    run_id = config.run_id or new_run_id()
    run = RunDir(Path(config.output).resolve(), run_id)
    stored = run.completed_summary()
    if stored is not None:
        return _summary_from_json(stored, already_complete=True)

    bundle = load_bundle(config.model, verify_hashes=config.verify_hashes)
    files = src.find_files(config.input)
    outputs = bind_outputs(bundle.manifest)
    # Checked before the run folder exists, so a bad argument leaves nothing behind.
    if config.sql is None:
        _plan_columns(bundle, src.first_schema(files), config)
    # One intra-op thread per call and several calls at once (on different batches), rather
    # than one call spread over every core: no thread pool spin-waiting between operators and
    # no per-operator synchronisation, which measured about 20% less CPU per row on the MLPs of
    # the benchmark. Either way onnxruntime never uses more than ``threads`` cores.
    model = OnnxModel(
        bundle, RuntimeOptions(intra_op_threads=1, inter_op_threads=1, device=config.device)
    )
    header = _header(config, bundle, files, run_id)
    done = run.open(header)
    attempt = _Attempt(config, bundle, model, run, outputs, files, done, started)
    try:
        summary = attempt.run(header)
    except BaseException:
        run.close()
        if not done and not attempt.records:
            # Nothing committed, nothing to resume: leave no trace.
            shutil.rmtree(run.work, ignore_errors=True)
        raise
    run.close()
    return summary


def _header(config: ScoreConfig, bundle: Bundle, files: list[Path], run_id: str) -> dict:
    """What a resume must match. ``on_error`` is left out on purpose: a run stopped by bad data
    under ``fail`` has committed only clean units, so it may be resumed with ``skip``."""
    details = {
        "model": [bundle.name, bundle.version, bundle.manifest.model_sha256],
        "files": src.file_fingerprint(files),
        "sql": config.sql,
        "features": list(config.features) if config.features is not None else None,
        "keys": list(config.keys),
        "batch_rows": config.batch_rows,
        "unit_rows": config.unit_rows,
    }
    digest = hashlib.sha256(json.dumps(details, sort_keys=True).encode()).hexdigest()
    return {
        "run_id": run_id,
        "fingerprint": digest,
        "resumable": config.sql is None or src.sql_is_ordered(config.sql),
        "details": details,
    }


def _plan_columns(
    bundle: Bundle, schema: pa.Schema, config: ScoreConfig
) -> tuple[list[InputBinding], list[pa.Field]]:
    keys = []
    for name in config.keys:
        if name not in schema.names:
            raise InvalidRequestError(
                f"key column {name!r} is not in the input (columns: {', '.join(schema.names)})",
                reason="keys",
            )
        keys.append(schema.field(name))
    bindings = bind_inputs(bundle.manifest, schema, config.features)
    return bindings, keys


def _summary_from_json(data: dict[str, Any], *, already_complete: bool) -> ScoreSummary:
    known = {f for f in ScoreSummary.__dataclass_fields__}
    values = {k: v for k, v in data.items() if k in known}
    values["already_complete"] = already_complete
    return ScoreSummary(**values)


class _Stopped(Exception):
    """Raised in a pipeline thread when another thread failed: unwind quietly."""


_END = object()


@dataclass(frozen=True)
class _Failure:
    """An input error, queued behind the batches read before it."""

    error: ModelfleetError


class _Attempt:
    """One process's attempt at a run: the three-stage pipeline over the pending units."""

    def __init__(
        self,
        config: ScoreConfig,
        bundle: Bundle,
        model: OnnxModel,
        run: RunDir,
        outputs: list[OutputBinding],
        files: list[Path],
        done: dict[int, UnitRecord],
        started: float,
    ) -> None:
        self.config = config
        self.bundle = bundle
        self.model = model
        self.run_dir = run
        self.outputs = outputs
        self.files = files
        self.done = done
        self.started = started
        self.records: dict[int, UnitRecord] = {}
        self.stop = threading.Event()
        self.failures: list[BaseException] = []
        self.q_in: queue.Queue = queue.Queue(maxsize=config.queue_depth)
        self.scorers = config.threads or available_cpus()
        # Room for every batch computing plus queue_depth finished ones awaiting the writer.
        self.q_out: queue.Queue = queue.Queue(maxsize=config.queue_depth + self.scorers)
        self.units_total: int | None = None
        self.restarted = False
        self.rows_read = 0

    # -- setup --------------------------------------------------------------------------------

    def run(self, header: dict[str, Any]) -> ScoreSummary:
        cfg = self.config
        units: list[src.Unit] = []
        reader: pa.RecordBatchReader | None = None
        con: Any = None  # a DuckDB connection when cfg.sql is set
        try:
            if cfg.sql is None:
                schema = src.first_schema(self.files)
                units = src.file_units(self.files, cfg.unit_rows)
                self.units_total = len(units)
                total_rows: int | None = sum(u.rows or 0 for u in units if u.index not in self.done)
            else:
                con, reader = src.open_sql(
                    self.files,
                    cfg.sql,
                    batch_rows=cfg.batch_rows,
                    threads=cfg.threads,
                    memory_limit=cfg.duckdb_memory_limit,
                    temp_dir=self.run_dir.work / DUCKDB_TMP_DIR,
                )
                schema = reader.schema
                total_rows = None  # unknown without running the query twice
                if self.done and not header["resumable"]:
                    log.warning(
                        "run %s: --sql has no ORDER BY, so its row order cannot be reproduced; "
                        "discarding %d committed units and starting over",
                        self.run_dir.run_id,
                        len(self.done),
                    )
                    self.run_dir.restart(header)
                    self.done = {}
                    self.restarted = True
            bindings, keys = _plan_columns(self.bundle, schema, cfg)
            self._prepare_output(keys)
            columns = list(dict.fromkeys([*cfg.keys, *(c for b in bindings for c in b.columns)]))

            def produce() -> None:
                if reader is None:
                    self._read_files(units, bindings, keys, columns)
                else:
                    self._read_sql(reader, bindings, keys)

            self.progress = Progress(
                total_rows, enabled=cfg.progress if cfg.progress is not None else wanted()
            )
            try:
                self._pipeline(produce)
            finally:
                self.progress.close()
        finally:
            if con is not None:
                con.close()
        return self._finish()

    def _prepare_output(self, keys: list[pa.Field]) -> None:
        meta = {
            "modelfleet.model": self.bundle.name,
            "modelfleet.model_version": str(self.bundle.version),
            "modelfleet.model_sha256": self.bundle.manifest.model_sha256,
            "modelfleet.run_id": self.run_dir.run_id,
        }
        self.out_schema = output_schema(keys, self.outputs, meta)
        self.rej_schema = rejected_schema(keys)
        # Dictionary pages only where values repeat: the constant columns and string keys.
        # Trying them on unique ids and float scores costs more than the rest of the write
        # and then falls back to plain encoding anyway.
        self.dictionary_columns = [
            f.name
            for f in self.out_schema
            if f.name in META_COLUMNS or (f.name in self.config.keys and _is_string(f.type))
        ]

    # -- the pipeline -------------------------------------------------------------------------

    def _pipeline(self, produce: Callable[[], None]) -> None:
        reader = threading.Thread(
            target=self._guard, args=(produce, self.q_in), name="batch-reader", daemon=True
        )
        writer = threading.Thread(
            target=self._guard, args=(self._write, None), name="batch-writer", daemon=True
        )
        reader.start()
        writer.start()
        try:
            self._score()
        except _Stopped:
            pass
        except BaseException as exc:  # KeyboardInterrupt lands here, in the main thread
            self._fail(exc)
        finally:
            reader.join()
            writer.join()
        if self.failures:
            raise self.failures[0]

    def _guard(self, body: Callable[[], None], end_queue: queue.Queue | None) -> None:
        try:
            try:
                body()
            except ModelfleetError as exc:
                if end_queue is None:
                    raise
                # Bad input travels down the pipeline in order, so the units read before it
                # are still scored and committed (a resume then starts at the bad unit).
                self._put(end_queue, _Failure(exc))
                return
            if end_queue is not None:
                self._put(end_queue, _END)
        except _Stopped:
            pass
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        # The first failure is the one reported; the others are its consequences.
        self.failures.append(exc)
        self.stop.set()

    def _put(self, q: queue.Queue, item: object) -> None:
        # Polling with a timeout instead of blocking forever, so a failure anywhere stops all.
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue) -> Any:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    # reader thread

    def _extract(
        self,
        batch: pa.RecordBatch,
        bindings: list[InputBinding],
        keys: list[pa.Field],
        source: str,
        first_row: int,
    ) -> Extracted:
        where = "SQL result" if source == src.SQL_SOURCE else source
        return extract(
            batch,
            bindings,
            keys,
            skip=self.config.on_error == "skip",
            source=source,
            first_row=first_row,
            locate=lambda row: f"{where} row {row}",
        )

    def _read_files(
        self,
        units: list[src.Unit],
        bindings: list[InputBinding],
        keys: list[pa.Field],
        columns: list[str],
    ) -> None:
        cache: dict[str, pq.ParquetFile] = {}
        for unit in units:
            if unit.index in self.done:
                continue
            row = unit.first_row
            for batch in src.read_unit(unit, columns, self.config.batch_rows, cache):
                ex = self._extract(batch, bindings, keys, unit.source, row)
                self._put(self.q_in, (unit.index, ex))
                row += batch.num_rows
            self._put(self.q_in, (unit.index, None))

    def _read_sql(
        self, reader: pa.RecordBatchReader, bindings: list[InputBinding], keys: list[pa.Field]
    ) -> None:
        per_unit = self.config.sql_unit_rows // self.config.batch_rows
        current = -1
        row = 0
        for i, batch in enumerate(src.rechunk(_sql_batches(reader), self.config.batch_rows)):
            unit = i // per_unit
            if unit != current:
                if current >= 0 and current not in self.done:
                    self._put(self.q_in, (current, None))
                current = unit
            if unit not in self.done:
                ex = self._extract(batch, bindings, keys, src.SQL_SOURCE, row)
                self._put(self.q_in, (unit, ex))
            row += batch.num_rows
        # An empty result still commits unit 0 (an empty part), so the output has a schema.
        current = max(current, 0)
        if current not in self.done:
            self._put(self.q_in, (current, None))
        self.units_total = current + 1

    # calling thread

    def _score(self) -> None:
        # Model calls run on a small pool and their futures queue up in input order, so the
        # writer gets results in order while several batches compute at once.
        pool = ThreadPoolExecutor(self.scorers, thread_name_prefix="batch-scorer")
        try:
            while True:
                item = self._get(self.q_in)
                if item is _END or isinstance(item, _Failure):
                    self._put(self.q_out, item)
                    break
                unit, ex = item
                future = None
                if ex is not None and ex.rows_valid:
                    future = pool.submit(self.model.run, ex.inputs)
                self._put(self.q_out, (unit, ex, future))
        except _Stopped:
            raise
        except BaseException as exc:
            # Stop everything before waiting for the pool, so queued calls are cancelled.
            self._fail(exc)
            raise _Stopped from None
        finally:
            # On success the writer still needs the queued futures; on failure drop them.
            pool.shutdown(wait=True, cancel_futures=self.stop.is_set())

    # writer thread

    def _write(self) -> None:
        part: _PartWriter | None = None
        try:
            while True:
                item = self._get(self.q_out)
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                unit, ex, future = item
                try:
                    results = future.result() if future is not None else None
                except CancelledError:
                    raise _Stopped from None
                if part is None:
                    part = _PartWriter(self, unit)
                if ex is None:
                    record = part.commit()
                    self.records[unit] = record
                    part = None
                    continue
                part.write(ex, results)
                self.rows_read += ex.rows_in
                self.progress.add(ex.rows_in)
        finally:
            if part is not None:
                part.abort()

    # -- the end ------------------------------------------------------------------------------

    def _finish(self) -> ScoreSummary:
        records = {**self.done, **self.records}
        missing = sorted(set(range(self.units_total or 0)) - set(records))
        if missing:  # an internal invariant: every unit exactly once
            raise ModelfleetError(f"run {self.run_dir.run_id}: units {missing[:10]} not written")
        duration = time.monotonic() - self.started
        rejected = sum(r.rows_rejected for r in records.values())
        summary = ScoreSummary(
            run_id=self.run_dir.run_id,
            output_path=str(self.run_dir.final),
            rejected_path=str(self.run_dir.rejected_path) if rejected else None,
            model_name=self.bundle.name,
            model_version=self.bundle.version,
            rows_in=sum(r.rows_in for r in records.values()),
            rows_out=sum(r.rows_out for r in records.values()),
            rows_rejected=rejected,
            parts=len(records),
            units_resumed=len(self.done),
            duration_s=round(duration, 3),
            rows_per_s=round(self.rows_read / duration, 1) if duration > 0 else 0.0,
            resumed=bool(self.done),
            restarted=self.restarted,
        )
        stored = summary.to_json()
        stored["finished_at"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self.run_dir.finish(records.values(), stored)
        return summary


def _is_string(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    )


def _sql_batches(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    import duckdb

    try:
        yield from reader
    except (duckdb.Error, pa.ArrowException) as exc:
        raise InvalidRequestError(f"--sql: {exc}", reason="sql") from None


class _PartWriter:
    """One unit's part file (and rejected-rows part), written under a .tmp name."""

    def __init__(self, attempt: _Attempt, unit: int) -> None:
        self.attempt = attempt
        self.unit = unit
        self.run_dir = attempt.run_dir
        self.path = self.run_dir.part_tmp(unit)
        self.writer = pq.ParquetWriter(
            self.path, attempt.out_schema, use_dictionary=attempt.dictionary_columns
        )
        self.rejected: pq.ParquetWriter | None = None
        self.rows_in = self.rows_out = self.rows_rejected = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0
        bundle = attempt.bundle
        self._meta = (
            pa.scalar(bundle.name, pa.string()),
            pa.scalar(bundle.version, pa.int64()),
            pa.scalar(self.run_dir.run_id, pa.string()),
        )

    def write(self, ex: Extracted, results: dict[str, np.ndarray] | None) -> None:
        self.rows_in += ex.rows_in
        if ex.rejected is not None and ex.rejected.num_rows:
            if self.rejected is None:
                self.rejected = pq.ParquetWriter(
                    self.run_dir.rejected_tmp(self.unit), self.attempt.rej_schema
                )
            self.rejected.write_batch(ex.rejected)
            self.rows_rejected += ex.rejected.num_rows
        n = ex.rows_valid
        if not n or results is None:
            return
        arrays = list(ex.keys)
        arrays += [o.to_arrow(results[o.name], n) for o in self.attempt.outputs]
        arrays += [pa.repeat(value, n) for value in self._meta]
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.attempt.out_schema)
        self._pending.append(batch)
        self._pending_bytes += batch.nbytes
        self.rows_out += n
        if self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        # Output rows are narrow (keys + scores), so one row group per model batch would make
        # many tiny row groups; buffering up to ROW_GROUP_BYTES keeps readers efficient while
        # bounding memory even for wide outputs (embeddings).
        if self._pending:
            table = pa.Table.from_batches(self._pending, schema=self.attempt.out_schema)
            self.writer.write_table(table, row_group_size=table.num_rows)
            self._pending, self._pending_bytes = [], 0

    def commit(self) -> UnitRecord:
        self._flush()
        self.writer.close()
        rejected_part = None
        if self.rejected is not None:
            self.rejected.close()
            rejected_part = part_name(self.unit)
        record = UnitRecord(
            unit=self.unit,
            part=part_name(self.unit),
            rows_in=self.rows_in,
            rows_out=self.rows_out,
            rows_rejected=self.rows_rejected,
            rejected_part=rejected_part,
        )
        self.run_dir.commit_unit(record)
        return record

    def abort(self) -> None:
        # The .tmp files stay: a resume deletes them. Closing releases the descriptors.
        for w in (self.writer, self.rejected):
            if w is not None:
                with contextlib.suppress(Exception):
                    w.close()
