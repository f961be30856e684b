"""The input side: which Parquet files, cut into which checkpoint units, read how.

A *unit* is the grain of checkpointing: each unit is scored into its own part file, and a
resumed run skips the units already committed. Units are deterministic functions of the input,
so an interrupted run and a clean run cut the data identically:

- plain Parquet input: a unit is one file and a contiguous range of its row groups, cut where at
  least ``unit_rows`` rows have accumulated (a row group is never split);
- ``--sql``: a unit is rows ``[k * unit_rows, (k + 1) * unit_rows)`` of the query's result
  stream. Only an ``ORDER BY`` makes that stream reproducible, so only then can a run resume.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from modelfleet.kernel.errors import InvalidRequestError

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
SQL_SOURCE = "sql"
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)
# Row groups up to this uncompressed size are decoded in one call and sliced into batches: about 20%
# less reader CPU per row than decoding batch by batch. Larger ones stream batch by batch, so
# memory stays bounded by this figure, not by how the input was written.
WHOLE_ROW_GROUP_BYTES = 64 << 20


@dataclass(frozen=True)
class Unit:
    index: int
    source: str
    # Row groups [start, end) of ``source`` (file units); None for SQL units.
    row_groups: tuple[int, int] | None
    # Row number of the unit's first row in its source (file row, or SQL result row).
    first_row: int
    # Known from Parquet metadata for file units; None for SQL units.
    rows: int | None

    def to_json(self) -> dict[str, object]:
        return {
            "unit": self.index,
            "source": self.source,
            "row_groups": list(self.row_groups) if self.row_groups else None,
            "first_row": self.first_row,
        }


def find_files(spec: str) -> list[Path]:
    """A Parquet file, a folder (searched recursively) or a glob, in a stable sorted order.

    Files and folders whose names start with ``.`` or ``_`` are skipped in folders, as Spark,
    pyarrow and DuckDB do, so a job may read the output folder of another job.
    """
    path = Path(spec)
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
            found += [
                Path(root, f).resolve()
                for f in files
                if f.endswith(PARQUET_SUFFIXES) and not f.startswith((".", "_"))
            ]
        files_found = sorted(found)
        if not files_found:
            raise InvalidRequestError(f"input {spec}: folder holds no .parquet files")
        return files_found
    if glob.has_magic(spec):
        matched = sorted(Path(p).resolve() for p in glob.glob(spec, recursive=True))
        matched = [p for p in matched if p.is_file()]
        if not matched:
            raise InvalidRequestError(f"input {spec}: the glob matches no files")
        return matched
    raise InvalidRequestError(f"input {spec}: no such file, folder or glob match")


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise InvalidRequestError(f"input {path}: not a readable Parquet file: {exc}") from None


def file_units(files: Sequence[Path], unit_rows: int) -> list[Unit]:
    """Cut files into units from their footers alone (no data is read)."""
    units: list[Unit] = []
    for path in files:
        meta = _open(path).metadata
        start, rows, first_row, offset = 0, 0, 0, 0
        for rg in range(meta.num_row_groups):
            rows += meta.row_group(rg).num_rows
            if rows >= unit_rows or rg == meta.num_row_groups - 1:
                units.append(Unit(len(units), str(path), (start, rg + 1), first_row, rows))
                offset += rows
                start, rows, first_row = rg + 1, 0, offset
        if meta.num_row_groups == 0:
            # An empty file still gets a (0-row) unit, so every input is accounted for.
            units.append(Unit(len(units), str(path), (0, 0), 0, 0))
    return units


def first_schema(files: Sequence[Path]) -> pa.Schema:
    return _open(files[0]).schema_arrow


def file_fingerprint(files: Sequence[Path]) -> list[list[object]]:
    """Identity of the input files: a resume against changed files would mix two datasets."""
    out: list[list[object]] = []
    for p in files:
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def read_unit(
    unit: Unit, columns: Sequence[str], batch_rows: int, cache: dict[str, pq.ParquetFile]
) -> Iterator[pa.RecordBatch]:
    """Stream a file unit's row groups as record batches of at most ``batch_rows`` rows."""
    assert unit.row_groups is not None
    start, end = unit.row_groups
    if start == end:
        return
    pf = cache.get(unit.source)
    if pf is None:
        cache.clear()  # units come file by file: keep one file open at a time
        pf = cache[unit.source] = _open(Path(unit.source))
    present = [c for c in columns if c in pf.schema_arrow.names]
    try:
        # One row group at a time: the reader pre-buffers every column chunk of the row groups
        # it is given, so handing it the whole unit would hold the unit's bytes in memory.
        for rg in range(start, end):
            if _decoded_size(pf, rg, present) <= WHOLE_ROW_GROUP_BYTES:
                yield from pf.read_row_group(rg, columns=present).to_batches(batch_rows)
            else:
                yield from pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=present)
    except (OSError, pa.ArrowException) as exc:
        raise InvalidRequestError(f"input {unit.source}: cannot read: {exc}") from None


def _decoded_size(pf: pq.ParquetFile, rg: int, columns: Sequence[str]) -> int:
    meta = pf.metadata.row_group(rg)
    wanted = set(columns)
    return sum(
        meta.column(i).total_uncompressed_size
        for i in range(meta.num_columns)
        if meta.column(i).path_in_schema.split(".", 1)[0] in wanted
    )


def sql_is_ordered(sql: str) -> bool:
    """A (textual) check for ORDER BY: the condition for resuming a --sql run."""
    return bool(_ORDER_BY.search(sql))


def rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Exactly ``rows`` rows per batch (the last one may be shorter).

    DuckDB's batch sizes depend on its threads and on filters; fixed sizes make unit and batch
    boundaries, and so the model's batches, identical between a run and its resume.
    """
    pending: list[pa.RecordBatch] = []
    have = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - have, batch.num_rows)
            pending.append(batch.slice(0, take))
            batch = batch.slice(take)
            have += take
            if have == rows:
                yield _concat(pending)
                pending, have = [], 0
    if have:
        yield _concat(pending)


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    return batches[0] if len(batches) == 1 else pa.concat_batches(batches)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def open_sql(
    files: Sequence[Path],
    sql: str,
    *,
    batch_rows: int,
    threads: int,
    memory_limit: str,
    temp_dir: Path,
) -> tuple[object, pa.RecordBatchReader]:
    """Run ``sql`` over the input files, exposed as the view ``input``, as a streaming reader.

    ``con.sql(...).to_arrow_reader()`` pulls result chunks as the reader is consumed, so a
    projection/filter query never holds more than a few batches; a query that must see every
    row first (ORDER BY, GROUP BY, joins) is held within ``memory_limit`` and spills to
    ``temp_dir`` beyond it. Returns the connection too: the reader is only valid while it lives.
    """
    import duckdb

    config: dict[str, str | bool | int | float | list[str]] = {
        "memory_limit": memory_limit,
        "temp_directory": str(temp_dir),
        # Keep the stream in the order DuckDB scanned it: a plain SELECT ... WHERE then yields
        # rows in file order, as the Parquet path does.
        "preserve_insertion_order": True,
    }
    if threads > 0:
        config["threads"] = threads
    try:
        con = duckdb.connect(":memory:", config=config)
        # The SQL reads the view and nothing else on this machine's disk or network: on an
        # agent it comes from the hub (a job), written by whoever has the operator role, and an
        # error quoting a file (a failed cast) comes back in the run's report. Only the input
        # files and the spill folder stay reachable.
        con.execute("SET allowed_paths = ?", [[str(p) for p in files]])
        con.execute("SET allowed_directories = ?", [[str(temp_dir)]])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        listing = ", ".join(_sql_literal(str(p)) for p in files)
        con.execute(f"CREATE VIEW input AS SELECT * FROM read_parquet([{listing}])")
        reader = con.sql(sql).to_arrow_reader(batch_size=batch_rows)
    except duckdb.Error as exc:
        raise InvalidRequestError(f"--sql: {exc}", reason="sql") from None
    if reader is None:
        raise InvalidRequestError("--sql: the statement returns no rows (use a SELECT)")
    return con, reader
