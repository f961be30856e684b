"""Columns <-> tensors: how Arrow record batches become model inputs and model outputs become
Arrow columns.

The mapping is decided once per run from the bundle's signature and the input's schema
(:func:`bind_inputs`), then applied to every record batch (:func:`extract`). Nothing is cast:
a column whose type is not exactly the model's datatype is an error that names the column, so a
silent float64 -> float32 (or int -> float) conversion can never change scores unnoticed. Casts
belong in ``--sql``, where they are visible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from modelfleet.kernel.bundle import Manifest, TensorSpec
from modelfleet.kernel.datatypes import NUMPY_BY_DATATYPE
from modelfleet.kernel.errors import InferenceError, InvalidRequestError

# Columns the engine adds to every output row.
META_COLUMNS = ("model_name", "model_version", "run_id")
# Columns of the rejected-rows file besides the key columns.
REJECT_COLUMNS = ("source", "row", "reason")
# None as a 0-d object array: elementwise "is this reason unset" with np.equal (numpy's stubs do
# not take a bare None there; the result is the same).
_NONE = np.array(None, dtype=object)

_STRING_TYPES = (
    pa.string(),
    pa.large_string(),
    pa.string_view(),
    pa.binary(),
    pa.large_binary(),
    pa.binary_view(),
)

# DuckDB spellings, so an error can say exactly which CAST to put in --sql.
_SQL_TYPE = {
    "FP16": "FLOAT",  # DuckDB has no half type; such a model needs a float16 Parquet column.
    "FP32": "FLOAT",
    "FP64": "DOUBLE",
    "INT8": "TINYINT",
    "INT16": "SMALLINT",
    "INT32": "INTEGER",
    "INT64": "BIGINT",
    "UINT8": "UTINYINT",
    "UINT16": "USMALLINT",
    "UINT32": "UINTEGER",
    "UINT64": "UBIGINT",
    "BOOL": "BOOLEAN",
    "BYTES": "VARCHAR",
}


def arrow_types(datatype: str) -> tuple[pa.DataType, ...]:
    """The Arrow types accepted, without any cast, for a model datatype."""
    if datatype == "BYTES":
        return _STRING_TYPES
    if datatype == "BOOL":
        return (pa.bool_(),)
    return (pa.from_numpy_dtype(NUMPY_BY_DATATYPE[datatype]),)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


@dataclass(frozen=True)
class InputBinding:
    """Where one model input comes from.

    kind ``list``: one list column (fixed-size or not) holding ``width`` values per row;
    ``features``: ``width`` scalar columns, stacked in the given order; ``scalar``: one scalar
    column (model inputs of shape [batch] or [batch, 1]).
    """

    name: str
    datatype: str
    row_shape: tuple[int, ...]
    kind: str
    columns: tuple[str, ...]

    @property
    def width(self) -> int:
        return math.prod(self.row_shape)

    def describe(self) -> str:
        return f"model input {self.name!r} ({self.datatype} {[-1, *self.row_shape]})"


def _batch_dims(spec: TensorSpec, what: str) -> tuple[int, ...]:
    if not spec.shape or spec.shape[0] != -1:
        raise InvalidRequestError(
            f"model {what} {spec.name!r} has shape {list(spec.shape)}: batch scoring needs a "
            "dynamic first (batch) dimension",
            reason="shape",
        )
    return tuple(spec.shape[1:])


def bind_inputs(
    manifest: Manifest, schema: pa.Schema, features: Sequence[str] | None
) -> list[InputBinding]:
    """Decide, once per run, which column(s) feed each model input.

    Rules, in order, for an input of shape [batch, F]: ``features`` (the ``--features`` flag)
    when given; else a column named like the input, if the input's schema has one; else the
    bundle's ``feature_names`` when there are exactly F of them; else a list column named like
    the input (reported as missing by :func:`extract`). Inputs of shape [batch] or [batch, 1]
    read a scalar column named like the input; other static shapes read a list column holding
    the row's values in C order.
    """
    bindings = []
    matrix_inputs = [s for s in manifest.inputs if len(s.shape) == 2]
    if features is not None and len(matrix_inputs) != 1:
        raise InvalidRequestError(
            "--features needs a model with exactly one input of shape [batch, F]; "
            f"this one has {[f'{s.name} {list(s.shape)}' for s in manifest.inputs]}",
            reason="features",
        )
    for spec in manifest.inputs:
        row_shape = _batch_dims(spec, "input")
        if any(d < 0 for d in row_shape):
            raise InvalidRequestError(
                f"model input {spec.name!r} has shape {list(spec.shape)}: only the batch "
                "dimension may be dynamic, since every row must have the same size",
                reason="shape",
            )
        width = math.prod(row_shape)
        names: tuple[str, ...] | None = None
        if len(row_shape) == 1 and spec in matrix_inputs:
            if features is not None:
                names = tuple(features)
            elif spec.name not in schema.names and len(manifest.feature_names) == width:
                names = tuple(manifest.feature_names)
        if names is not None:
            if len(names) != width:
                raise InvalidRequestError(
                    f"--features names {len(names)} columns, but model input {spec.name!r} "
                    f"has {width} features (shape {list(spec.shape)})",
                    reason="features",
                )
            if len(set(names)) != len(names):
                raise InvalidRequestError(f"--features repeats a column: {list(names)}")
            bindings.append(InputBinding(spec.name, spec.datatype, row_shape, "features", names))
            continue
        kind = "list"
        if width == 1:
            # [batch] and [batch, 1] read a scalar column; a one-element list works as well.
            field = schema.field(spec.name) if spec.name in schema.names else None
            if field is None or not _is_list(field.type):
                kind = "scalar"
        bindings.append(InputBinding(spec.name, spec.datatype, row_shape, kind, (spec.name,)))
    return bindings


@dataclass(frozen=True)
class OutputBinding:
    name: str
    datatype: str
    # Dimensions after the batch one; -1 where the model leaves them dynamic.
    row_shape: tuple[int, ...]

    @property
    def arrow_type(self) -> pa.DataType:
        value = pa.string() if self.datatype == "BYTES" else arrow_types(self.datatype)[0]
        if any(d < 0 for d in self.row_shape):
            return pa.list_(value)
        width = math.prod(self.row_shape)
        return value if width == 1 else pa.list_(value, width)

    def to_arrow(self, values: np.ndarray, rows: int) -> pa.Array:
        if values.ndim == 0 or values.shape[0] != rows:
            raise InferenceError(
                f"model output {self.name!r} has shape {list(values.shape)} for {rows} input "
                "rows: batch scoring needs one output row per input row",
                reason="shape",
            )
        width = math.prod(values.shape[1:])
        flat = values.reshape(-1)
        child = pa.array(flat, type=pa.string()) if self.datatype == "BYTES" else pa.array(flat)
        out_type = self.arrow_type
        if pa.types.is_fixed_size_list(out_type):
            if width != out_type.list_size:
                raise InferenceError(
                    f"model output {self.name!r} has {width} values per row, the bundle "
                    f"declares {out_type.list_size}",
                    reason="shape",
                )
            return pa.FixedSizeListArray.from_arrays(child, width)
        if pa.types.is_list(out_type):
            offsets = pa.array(np.arange(0, rows * width + 1, max(width, 1), dtype=np.int32))
            if width == 0:
                offsets = pa.array(np.zeros(rows + 1, dtype=np.int32))
            return pa.ListArray.from_arrays(offsets, child)
        return child


def bind_outputs(manifest: Manifest) -> list[OutputBinding]:
    return [OutputBinding(s.name, s.datatype, _batch_dims(s, "output")) for s in manifest.outputs]


def output_schema(
    keys: Sequence[pa.Field], outputs: Sequence[OutputBinding], metadata: dict[str, str]
) -> pa.Schema:
    fields = [*keys, *(pa.field(o.name, o.arrow_type, nullable=False) for o in outputs)]
    fields += [
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.int64(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
    names = [f.name for f in fields]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise InvalidRequestError(
            f"output column(s) {clash} would appear twice: a key column has the name of a model "
            f"output or of {', '.join(META_COLUMNS)}; rename it in --sql",
            reason="keys",
        )
    return pa.schema(fields, metadata=metadata)


def rejected_schema(keys: Sequence[pa.Field]) -> pa.Schema:
    # Key columns are nullable here: a batch rejected because a key column is missing or of
    # another type has no key values to show.
    fields = [pa.field(k.name, k.type, nullable=True) for k in keys]
    fields += [
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
    return pa.schema(fields)


@dataclass
class Extracted:
    """One record batch, mapped: the model inputs and keys of its valid rows, and the rest."""

    rows_in: int
    inputs: dict[str, np.ndarray]
    keys: list[pa.Array]
    rows_valid: int
    # Keys + source + row + reason of rejected rows (None when every row is valid).
    rejected: pa.RecordBatch | None


def _type_error(column: str, got: pa.DataType, binding: InputBinding) -> str:
    want = arrow_types(binding.datatype)[0]
    hint = _SQL_TYPE.get(binding.datatype, binding.datatype)
    if binding.kind == "list":
        return (
            f"column {column!r} is {got}, {binding.describe()} needs a list of {binding.width} "
            f"{want} values per row; no casts are made: cast in --sql, e.g. "
            f"CAST({column} AS {hint}[{binding.width}]), or name scalar columns with --features"
        )
    return (
        f"column {column!r} is {got}, {binding.describe()} needs {want}; no casts are made: "
        f"cast in --sql, e.g. CAST({column} AS {hint})"
    )


def _missing(column: str, binding: InputBinding) -> str:
    if binding.kind == "features":
        position = binding.columns.index(column)
        return f"missing column {column!r} (feature {position} of {binding.describe()})"
    if binding.kind == "list":
        return (
            f"missing column {column!r} ({binding.describe()} reads a list column of that name, "
            "or scalar feature columns named with --features)"
        )
    return f"missing column {column!r} ({binding.describe()})"


def _column_errors(
    schema: pa.Schema, bindings: Sequence[InputBinding], keys: Sequence[pa.Field]
) -> list[str]:
    """Problems that concern a whole column (and so every row of the batch)."""
    errors = []
    accepted_cache: dict[str, tuple[pa.DataType, ...]] = {}
    for b in bindings:
        accepted = accepted_cache.setdefault(b.datatype, arrow_types(b.datatype))
        for col in b.columns:
            if col not in schema.names:
                errors.append(_missing(col, b))
                continue
            t = schema.field(col).type
            if b.kind == "list":
                if not _is_list(t) or t.value_type not in accepted:
                    errors.append(_type_error(col, t, b))
                elif pa.types.is_fixed_size_list(t) and t.list_size != b.width:
                    errors.append(
                        f"column {col!r} holds {t.list_size} values per row, {b.describe()} "
                        f"needs {b.width}"
                    )
            elif t not in accepted:
                errors.append(_type_error(col, t, b))
    for k in keys:
        if k.name not in schema.names:
            errors.append(f"missing key column {k.name!r}")
        elif schema.field(k.name).type != k.type:
            errors.append(
                f"key column {k.name!r} is {schema.field(k.name).type} here but "
                f"{k.type} in the first input; output parts must share one schema"
            )
    return errors


def _row_problems(batch: pa.RecordBatch, bindings: Sequence[InputBinding]) -> np.ndarray | None:
    """Per-row reasons (None = valid) for nulls and wrong list lengths, or None if all rows are
    valid. Only called once the column types are known to be right."""
    n = batch.num_rows
    reasons: np.ndarray | None = None

    def flag(mask: np.ndarray, reason: str) -> None:
        nonlocal reasons
        if not mask.any():
            return
        if reasons is None:
            reasons = np.full(n, None, dtype=object)
        # The first problem found for a row is the one reported.
        reasons[mask & np.equal(reasons, _NONE)] = reason

    for b in bindings:
        for col in b.columns:
            arr = batch.column(col)
            if arr.null_count:
                flag(arr.is_null().to_numpy(zero_copy_only=False), f"column {col!r} is null")
            if b.kind != "list":
                continue
            if pa.types.is_fixed_size_list(arr.type):
                size = arr.type.list_size
                child = arr.values.slice(arr.offset * size, n * size)
                if child.null_count:
                    mask = child.is_null().to_numpy(zero_copy_only=False).reshape(n, size)
                    flag(mask.any(axis=1), f"column {col!r} holds a null value")
                continue
            offsets = arr.offsets.to_numpy()
            lengths = np.diff(offsets)
            flag(
                (lengths != b.width) & ~arr.is_null().to_numpy(zero_copy_only=False),
                f"column {col!r} holds a list of the wrong length ({b.describe()} needs "
                f"{b.width} values per row)",
            )
            child = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
            if child.null_count and len(child):
                nulls = child.is_null().to_numpy(zero_copy_only=False)
                starts = np.minimum(offsets[:-1] - offsets[0], len(child) - 1)
                per_row = np.logical_or.reduceat(nulls, starts) & (lengths > 0)
                flag(per_row, f"column {col!r} holds a null value")
    return reasons


def _to_numpy(arr: pa.Array, datatype: str) -> np.ndarray:
    values = arr.to_numpy(zero_copy_only=False)
    if datatype == "BYTES" or values.dtype == NUMPY_BY_DATATYPE[datatype]:
        return values
    return values.astype(NUMPY_BY_DATATYPE[datatype])  # bool: Arrow packs bits, numpy bytes


def _tensor(batch: pa.RecordBatch, b: InputBinding) -> np.ndarray:
    n = batch.num_rows
    shape = (n, *b.row_shape)
    if b.kind == "features":
        dtype = NUMPY_BY_DATATYPE[b.datatype]
        # One strided copy per feature column into a C-contiguous [n, F] array: the cheapest
        # way to turn column-major Arrow data into the row-major tensor onnxruntime wants.
        out = np.empty((n, b.width), dtype=dtype)
        for j, col in enumerate(b.columns):
            out[:, j] = _to_numpy(batch.column(col), b.datatype)
        return out.reshape(shape)
    arr = batch.column(b.columns[0])
    if b.kind == "scalar":
        return _to_numpy(arr, b.datatype).reshape(shape)
    if pa.types.is_fixed_size_list(arr.type):
        child = arr.values.slice(arr.offset * b.width, n * b.width)
    else:
        start = arr.offsets[0].as_py()
        child = arr.values.slice(start, arr.offsets[n].as_py() - start)
    # Zero-copy for numeric lists: the child buffer already is the row-major tensor.
    return _to_numpy(child, b.datatype).reshape(shape)


def extract(
    batch: pa.RecordBatch,
    bindings: Sequence[InputBinding],
    keys: Sequence[pa.Field],
    *,
    skip: bool,
    source: str,
    first_row: int,
    locate: Callable[[int], str],
) -> Extracted:
    """Map one record batch; bad rows raise :class:`InvalidRequestError` or, with ``skip``, are
    returned in ``rejected`` with their reason. ``first_row`` is the batch's row number in its
    source, and ``locate(row)`` describes a row for error messages."""
    n = batch.num_rows
    errors = _column_errors(batch.schema, bindings, keys)
    if errors:
        reason = "; ".join(errors)
        if not skip:
            raise InvalidRequestError(f"{locate(first_row)}: {reason}", reason="column")
        reasons = np.full(n, reason, dtype=object)
        rejected = _rejected(batch, keys, np.arange(n), reasons, source, first_row)
        return Extracted(n, {}, [], 0, rejected)
    problems = _row_problems(batch, bindings)
    rejected = None
    if problems is not None:
        reasons = problems
        bad = np.flatnonzero(np.not_equal(reasons, _NONE))
        if not skip:
            row = int(bad[0])
            more = f" (and {len(bad) - 1} more rows in this batch)" if len(bad) > 1 else ""
            raise InvalidRequestError(
                f"{locate(first_row + row)}: {reasons[row]}{more}", reason="null"
            )
        rejected = _rejected(batch, keys, bad, reasons[bad], source, first_row)
        batch = batch.filter(pa.array(np.equal(reasons, _NONE)))
    inputs = {b.name: _tensor(batch, b) for b in bindings}
    key_arrays = [batch.column(k.name) for k in keys]
    return Extracted(n, inputs, key_arrays, batch.num_rows, rejected)


def _rejected(
    batch: pa.RecordBatch,
    keys: Sequence[pa.Field],
    rows: np.ndarray,
    reasons: np.ndarray,
    source: str,
    first_row: int,
) -> pa.RecordBatch:
    m = len(rows)
    take = pa.array(rows, type=pa.int64())
    arrays = []
    for k in keys:
        ok = k.name in batch.schema.names and batch.schema.field(k.name).type == k.type
        arrays.append(batch.column(k.name).take(take) if ok else pa.nulls(m, type=k.type))
    arrays += [
        pa.repeat(pa.scalar(source, pa.string()), m),
        pa.array(rows + first_row, type=pa.int64()),
        pa.array(reasons, type=pa.string()),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=rejected_schema(keys))
