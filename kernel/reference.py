"""Build a bundle's reference statistics from a reference dataset (``--reference FILE``).

Two kinds of file are accepted, told apart by their first bytes:

- **Parquet** (starts with ``PAR1``): reference rows. For each model input, either one column
  named like the input (scalars for an input ``[N]`` or ``[N, 1]``, lists for anything wider:
  each row's values, flattened, in C order), or, for a 2-D input ``[N, F]``, F scalar columns
  named after the manifest's feature names (when the model has one such input and the counts
  match) or ``<input>[0]`` ... ``<input>[F-1]``. The model is run on the rows (onnxruntime, CPU)
  to get the outputs' reference too.
- **JSON**: statistics computed elsewhere, in the reference.json format; validated as is.

Either way the result is checked against the model's signature (see ``check_reference``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelfleet.kernel.datatypes import NUMPY_BY_DATATYPE
from modelfleet.kernel.drift import (
    DEFAULT_BINS,
    DEFAULT_TOP_K,
    MIN_REFERENCE_ROWS,
    Reference,
    TensorRef,
    build_tensor_ref,
    parse_reference,
)
from modelfleet.kernel.errors import BundleError

# Rows per onnxruntime call when computing the outputs' reference.
RUN_CHUNK_ROWS = 4096
# The projection seed of summarised tensors: fixed, so the same data gives the same reference.
PROJECTION_SEED = 20261207


def _width(shape: Sequence[int]) -> int:
    """Values per row of a tensor shape whose dimension 0 is the row (0: some are dynamic)."""
    rest = shape[1:]
    if any(d < 0 for d in rest):
        return 0
    return math.prod(rest) if rest else 1


def check_reference(
    reference: Reference, inputs: Sequence[Any], outputs: Sequence[Any], where: str
) -> None:
    """Refuse a reference naming tensors the model lacks or with another width per row.

    ``inputs``/``outputs`` are the bundle's TensorSpecs (name, datatype, shape).
    """
    by_role = {"input": {t.name: t for t in inputs}, "output": {t.name: t for t in outputs}}
    for t in reference.tensors:
        spec = by_role[t.role].get(t.tensor)
        if spec is None:
            raise BundleError(
                f"{where}: reference names {t.role} {t.tensor!r}, which the model does not have "
                f"(its {t.role}s: {sorted(by_role[t.role])})"
            )
        width = _width(spec.shape)
        # A dynamic width must stay 0 in the reference: the agent sizes the projection matrix
        # by it, so a number the signature does not vouch for is refused.
        if width != t.width:
            raise BundleError(
                f"{where}: reference has {t.width} values per row for {t.role} {t.tensor!r}, "
                f"the model has {width or 'a dynamic number'} (shape {list(spec.shape)})"
            )


def _column_array(table: Any, column: str, rows: int, width: int, where: str) -> np.ndarray:
    import pyarrow as pa

    col = table.column(column).combine_chunks()
    if (
        pa.types.is_list(col.type)
        or pa.types.is_large_list(col.type)
        or (pa.types.is_fixed_size_list(col.type))
    ):
        if col.null_count:
            raise BundleError(f"{where}: list column {column!r} has null rows")
        values = col.flatten()
        if width and len(values) != rows * width:
            raise BundleError(
                f"{where}: list column {column!r} holds {len(values)} values for {rows} rows; "
                f"the model takes {width} values per row"
            )
        arr = values.to_numpy(zero_copy_only=False)
        per_row = len(values) // rows if rows else 0
        if per_row * rows != len(values):
            raise BundleError(f"{where}: list column {column!r} has rows of different lengths")
        return np.asarray(arr).reshape(rows, per_row)
    return np.asarray(col.to_numpy(zero_copy_only=False)).reshape(rows, 1)


def _cast(arr: np.ndarray, spec: Any, where: str, what: str) -> np.ndarray:
    want = NUMPY_BY_DATATYPE[spec.datatype]
    if spec.datatype == "BYTES":
        return arr.astype(object)
    if arr.dtype.kind == "O":
        raise BundleError(
            f"{where}: {what} holds nulls or mixed values; the model expects {spec.datatype}"
        )
    if arr.dtype.kind == "f" and want.kind in "iub" and np.isnan(arr).any():
        raise BundleError(f"{where}: {what} has missing values; the model expects {spec.datatype}")
    return arr.astype(want)


def read_parquet_inputs(
    path: Path, inputs: Sequence[Any], feature_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The model inputs held by a reference Parquet file, shaped [rows, *non-batch dims]."""
    import pyarrow.parquet as pq

    where = f"reference {path}"
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise BundleError(f"{where}: cannot read Parquet: {exc}") from None
    rows = table.num_rows
    have = set(table.column_names)
    two_d = [s for s in inputs if len(s.shape) == 2 and s.shape[1] > 0]
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        width = _width(spec.shape)
        if spec.name in have:
            arr = _column_array(table, spec.name, rows, width, where)
            what = f"column {spec.name!r}"
        elif len(spec.shape) == 2 and spec.shape[1] > 0:
            use_names = len(two_d) == 1 and len(feature_names) == spec.shape[1]
            names = (
                list(feature_names)
                if use_names
                else [f"{spec.name}[{i}]" for i in range(spec.shape[1])]
            )
            missing = [n for n in names if n not in have]
            if missing:
                raise BundleError(
                    f"{where}: no column for input {spec.name!r}: expected a column "
                    f"{spec.name!r} or the columns {names[0]!r} ... {names[-1]!r} "
                    f"(missing {missing[:5]}); the file has {sorted(have)[:10]}"
                )
            arr = np.column_stack([table.column(n).to_numpy(zero_copy_only=False) for n in names])
            what = f"the columns of input {spec.name!r}"
        else:
            raise BundleError(
                f"{where}: no column {spec.name!r} for input {spec.name!r} "
                f"(shape {list(spec.shape)}); the file has {sorted(have)[:10]}"
            )
        arr = _cast(arr, spec, where, what)
        rest = [d if d > 0 else -1 for d in spec.shape[1:]]
        try:
            out[spec.name] = arr.reshape(rows, *rest) if rest else arr.reshape(rows)
        except ValueError:
            raise BundleError(
                f"{where}: {what} has {arr.shape[1]} values per row, which do not fit the "
                f"input's shape {list(spec.shape)}"
            ) from None
    return out


def run_model(
    model_bytes: bytes, inputs: Mapping[str, np.ndarray], outputs: Sequence[Any], rows: int
) -> dict[str, np.ndarray]:
    """The model's outputs on all reference rows, computed in chunks."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        fixed = {i.name: i.shape[0] for i in session.get_inputs()}
        chunk = next((d for d in fixed.values() if isinstance(d, int) and d > 0), RUN_CHUNK_ROWS)
        names = [o.name for o in outputs]
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for start in range(0, rows, chunk):
            feed = {k: v[start : start + chunk] for k, v in inputs.items()}
            for i, res in enumerate(session.run(names, feed)):
                parts[i].append(np.asarray(res))
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(
            f"onnxruntime cannot run the model on the reference rows: {exc}"
        ) from None
    return {n: np.concatenate(p) for n, p in zip(names, parts, strict=True)}


def reference_from_arrays(
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    input_specs: Sequence[Any],
    output_specs: Sequence[Any],
    *,
    feature_names: Sequence[str] = (),
    bins: int = DEFAULT_BINS,
    top_k: int = DEFAULT_TOP_K,
    min_rows: int = MIN_REFERENCE_ROWS,
    source: str = "",
) -> Reference:
    """Statistics of every input and output from reference rows already in memory."""
    if bins < 2:
        raise BundleError(f"reference bins must be >= 2, got {bins}")
    if top_k < 1:
        raise BundleError(f"reference top-k must be >= 1, got {top_k}")
    rows = {len(a) for a in (*inputs.values(), *outputs.values())}
    if len(rows) != 1:
        raise BundleError(f"reference arrays have different row counts {sorted(rows)}")
    n = rows.pop()
    if n < min_rows:
        raise BundleError(
            f"reference has {n} rows; at least {min_rows} are needed, or the reference's own "
            "sampling noise reads as drift (see docs/monitoring.md)"
        )
    two_d = [s for s in input_specs if len(s.shape) == 2 and s.shape[1] > 0]
    tensors: list[TensorRef] = []
    for role, specs, arrays in (
        ("input", input_specs, inputs),
        ("output", output_specs, outputs),
    ):
        for spec in specs:
            names: Sequence[str] = ()
            if (
                role == "input"
                and len(two_d) == 1
                and spec is two_d[0]
                and len(feature_names) == spec.shape[1]
            ):
                names = feature_names
            tensors.append(
                build_tensor_ref(
                    spec.name,
                    role,  # type: ignore[arg-type]  # "input" or "output" from the tuple above
                    np.asarray(arrays[spec.name]),
                    width=_width(spec.shape) or 0,
                    names=names,
                    bins=bins,
                    top_k=top_k,
                    projection_seed=PROJECTION_SEED,
                )
            )
    return Reference(n, tuple(tensors), bins, top_k, source)


def reference_from_file(
    path: Path | str,
    *,
    model_bytes: bytes,
    inputs: Sequence[Any],
    outputs: Sequence[Any],
    feature_names: Sequence[str] = (),
    bins: int = DEFAULT_BINS,
    top_k: int = DEFAULT_TOP_K,
    min_rows: int = MIN_REFERENCE_ROWS,
) -> Reference:
    """A reference from a Parquet dataset or a reference.json (see the module doc)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise BundleError(f"cannot read reference {path}: {exc}") from None
    if head == b"PAR1":
        arrays = read_parquet_inputs(path, inputs, feature_names)
        rows = next(iter(arrays.values())).shape[0] if arrays else 0
        if rows < min_rows:
            raise BundleError(
                f"reference {path} has {rows} rows; at least {min_rows} are needed, or the "
                "reference's own sampling noise reads as drift (see docs/monitoring.md)"
            )
        outs = run_model(model_bytes, arrays, outputs, rows)
        ref = reference_from_arrays(
            arrays,
            outs,
            inputs,
            outputs,
            feature_names=feature_names,
            bins=bins,
            top_k=top_k,
            min_rows=min_rows,
            source=path.name,
        )
    else:
        try:
            data = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(
                f"reference {path} is neither Parquet nor valid JSON: {exc}"
            ) from None
        try:
            ref = parse_reference(data)
        except BundleError as exc:
            raise BundleError(f"reference {path}: {exc}") from None
    check_reference(ref, inputs, outputs, f"reference {path}")
    return ref
