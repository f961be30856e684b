"""Reference statistics and drift scores: the pure, numpy-only core (docs/monitoring.md).

A bundle may carry ``reference.json``: per feature of each input and output tensor, the bins a
reference dataset fell into and how many rows fell in each. Drift is then a comparison of
counts: live rows are binned against the same edges or categories, and the two histograms are
compared with PSI, the Jensen-Shannon distance and a binned Kolmogorov-Smirnov statistic.

- A *feature* of a tensor ``x[N, ...]`` with at most :data:`WIDE_FEATURES` values per row is
  one of those values (a column of ``x`` once the non-batch dimensions are flattened). A wider
  tensor (an image, an embedding) is summarised per row instead: mean, standard deviation, and
  a fixed random projection to :data:`PROJECTION_DIMS` dimensions whose seed is stored.
- A *numeric* feature has strictly increasing interior edges ``e_0 < ... < e_{m-1}``; bin ``i``
  is ``[e_{i-1}, e_i)`` with open outer bins ``(-inf, e_0)`` and ``[e_{m-1}, +inf)``. Counts
  have ``m + 2`` slots: ``m + 1`` bins, then *missing* (NaN).
- A *categorical* feature has up to ``top_k`` categories; counts have ``k + 2`` slots: one per
  category, then *other*, then *missing*.

Nothing here does I/O; building a reference from a Parquet file lives in ``kernel.reference``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from modelfleet.kernel.errors import BundleError

REFERENCE_FORMAT = 1
DEFAULT_BINS = 10
DEFAULT_TOP_K = 20
# Tensors with more values per row than this are summarised (mean, std, projection): per-value
# features would make the reference and the per-window counts as large as the data itself.
WIDE_FEATURES = 256
PROJECTION_DIMS = 8
# Too few rows make the reference's own sampling noise look like drift: the expected PSI of two
# samples of one distribution is about (bins - 1) * (1/n_ref + 1/n_live); at 500 reference rows
# and 10 bins the reference's share is 0.018, under a tenth of the 0.2 alert threshold.
MIN_REFERENCE_ROWS = 500
# Added to every bin's proportion before PSI's log ratio, so an empty bin on one side gives a
# large but finite term (an empty bin on both sides gives 0).
PSI_EPSILON = 1e-4
# The conventional "significant shift" level; the default of the drift alert rule (issue 16).
PSI_ALERT = 0.2

Kind = Literal["numeric", "categorical"]
Role = Literal["input", "output"]
Reduction = Literal["columns", "summary"]
Category = int | str
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class FeatureRef:
    """One feature's reference histogram (see the module doc for the slot layout)."""

    name: str
    kind: Kind
    counts: tuple[int, ...]
    edges: tuple[float, ...] = ()
    categories: tuple[Category, ...] = ()

    @property
    def slots(self) -> int:
        return len(self.edges) + 2 if self.kind == "numeric" else len(self.categories) + 2

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == "numeric":
            out["edges"] = list(self.edges)
        else:
            out["categories"] = list(self.categories)
        out["counts"] = list(self.counts)
        return out


@dataclass(frozen=True)
class TensorRef:
    """The features of one input or output tensor."""

    tensor: str
    role: Role
    reduction: Reduction
    # Values per row (product of the non-batch dimensions); 0 when a dimension is dynamic.
    width: int
    features: tuple[FeatureRef, ...]
    # Summary only: the random projection's seed and size (0: no projection).
    projection_seed: int = 0
    projection_dims: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tensor": self.tensor,
            "role": self.role,
            "reduction": self.reduction,
            "width": self.width,
        }
        if self.reduction == "summary":
            out["projection"] = {"seed": self.projection_seed, "dims": self.projection_dims}
        out["features"] = [f.to_json() for f in self.features]
        return out


@dataclass(frozen=True)
class Reference:
    rows: int
    tensors: tuple[TensorRef, ...]
    bins: int = DEFAULT_BINS
    top_k: int = DEFAULT_TOP_K
    source: str = ""
    format: int = REFERENCE_FORMAT

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "rows": self.rows,
            "bins": self.bins,
            "top_k": self.top_k,
            "source": self.source,
            "tensors": [t.to_json() for t in self.tensors],
        }

    def tensor(self, name: str) -> TensorRef | None:
        return next((t for t in self.tensors if t.tensor == name), None)

    def features(self) -> list[tuple[TensorRef, FeatureRef]]:
        return [(t, f) for t in self.tensors for f in t.features]


# ---------------------------------------------------------------------------------------------
# Features of a tensor


def _rows_view(arr: np.ndarray) -> np.ndarray:
    """``arr`` as [rows, values per row] (a view when possible); a 0-d array is one row."""
    if arr.ndim == 0:
        return arr.reshape(1, 1)
    return arr.reshape(arr.shape[0], -1)


def projection_matrix(seed: int, width: int, dims: int) -> npt.NDArray[np.float32]:
    """The fixed random projection of a summarised tensor: Gaussian, scaled by 1/sqrt(width)
    so every projected value has the scale of one input value."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((width, dims)) / math.sqrt(width)).astype(np.float32)


def summary_features(arr: np.ndarray, projection: npt.NDArray[np.float32] | None) -> FloatArray:
    """Per row: mean, std and (when given) the projection of a wide tensor's values."""
    flat = _rows_view(arr)
    if flat.dtype.kind not in "fiub":
        raise BundleError(f"cannot summarise values of dtype {flat.dtype}")
    flat32 = flat.astype(np.float32, copy=False)
    parts = [flat32.mean(axis=1, dtype=np.float64), flat32.std(axis=1, dtype=np.float64)]
    out = np.column_stack(parts)
    if projection is not None:
        out = np.hstack([out, (flat32 @ projection).astype(np.float64)])
    return out


# ---------------------------------------------------------------------------------------------
# Building a reference from arrays


def quantile_edges(values: np.ndarray, bins: int) -> tuple[float, ...]:
    """Interior edges at the 1/bins ... (bins-1)/bins quantiles of the finite values,
    deduplicated (ties collapse bins; a constant feature keeps one edge, so two bins)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return ()
    qs = np.quantile(finite.astype(np.float64), np.linspace(0.0, 1.0, bins + 1)[1:-1])
    edges = np.unique(qs) if bins > 1 else np.array([float(np.median(finite))])
    return tuple(float(e) for e in edges)


def top_categories(values: np.ndarray, top_k: int) -> tuple[Category, ...]:
    """The ``top_k`` most frequent values, most frequent first (ties: smaller value first)."""
    if values.dtype.kind == "O":
        keep = np.array([v for v in values if v is not None and v == v], dtype=object)
        uniq, counts = np.unique(keep.astype(str), return_counts=True)
    else:
        keep = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        uniq, counts = np.unique(keep, return_counts=True)
    order = np.lexsort((np.arange(len(uniq)), -counts))[:top_k]
    return tuple(_category(uniq[i]) for i in order)


def _category(value: Any) -> Category:
    if isinstance(value, str | np.str_):
        return str(value)
    return int(value)


def _is_categorical(values: np.ndarray, top_k: int) -> bool:
    kind = values.dtype.kind
    if kind in "OUS":
        return True
    if kind in "iub":
        return len(np.unique(values)) <= top_k
    # Codes stored as floats (a model input is often FP32 throughout): categories too, so a code
    # never seen in the reference counts as "other" instead of landing in an outer bin.
    finite = values[np.isfinite(values)]
    if finite.size == 0 or not np.all(finite == np.round(finite)):
        return False
    return len(np.unique(finite)) <= top_k


def build_tensor_ref(
    tensor: str,
    role: Role,
    data: np.ndarray,
    *,
    width: int,
    names: Sequence[str] = (),
    bins: int = DEFAULT_BINS,
    top_k: int = DEFAULT_TOP_K,
    projection_seed: int = 0,
) -> TensorRef:
    """The reference of one tensor from its reference rows ``data[rows, ...]``.

    ``width`` is the number of values per row the signature promises (0: dynamic). Tensors wider
    than :data:`WIDE_FEATURES` or with a dynamic width are summarised.
    """
    flat = _rows_view(data)
    if width and flat.shape[1] != width:
        raise BundleError(
            f"reference: tensor {tensor!r} has {flat.shape[1]} values per row, its signature "
            f"says {width}"
        )
    if width and width <= WIDE_FEATURES:
        if names and len(names) != width:
            names = ()
        single = flat.shape[1] == 1 and data.ndim <= 1
        feats: list[FeatureRef] = []
        for i in range(width):
            col = flat[:, i]
            name = names[i] if names else (tensor if single else f"{tensor}[{i}]")
            if _is_categorical(col, top_k):
                cats = top_categories(col, top_k)
                feats.append(FeatureRef(name, "categorical", (), categories=cats))
            else:
                edges = quantile_edges(col, bins)
                if not edges:
                    raise BundleError(
                        f"reference: feature {name!r} of tensor {tensor!r} has no finite value"
                    )
                feats.append(FeatureRef(name, "numeric", (), edges=edges))
        shell = TensorRef(tensor, role, "columns", width, tuple(feats))
    else:
        if flat.dtype.kind in "OUS":
            raise BundleError(
                f"reference: tensor {tensor!r} holds strings and is too wide "
                f"({flat.shape[1]} values per row, at most {WIDE_FEATURES}) to monitor per value"
            )
        dims = PROJECTION_DIMS if width else 0
        proj = projection_matrix(projection_seed, width, dims) if dims else None
        summary = summary_features(data, proj)
        fnames = [f"{tensor}:mean", f"{tensor}:std"] + [f"{tensor}:proj[{j}]" for j in range(dims)]
        feats = []
        for j, name in enumerate(fnames):
            edges = quantile_edges(summary[:, j], bins)
            if not edges:
                raise BundleError(f"reference: feature {name!r} has no finite value")
            feats.append(FeatureRef(name, "numeric", (), edges=edges))
        shell = TensorRef(
            tensor, role, "summary", width, tuple(feats), projection_seed, dims if dims else 0
        )
    # Counted with the same binner the agent uses, so reference and live counts agree exactly
    # on which bin a value at an edge belongs to.
    binner = TensorBinner(shell)
    counts = binner.count(binner.features(data))
    done = tuple(
        FeatureRef(f.name, f.kind, tuple(int(c) for c in counts[k]), f.edges, f.categories)
        for k, f in enumerate(shell.features)
    )
    return TensorRef(
        tensor, role, shell.reduction, width, done, shell.projection_seed, shell.projection_dims
    )


# ---------------------------------------------------------------------------------------------
# Parsing and validating reference.json


def _err(where: str, msg: str) -> BundleError:
    return BundleError(f"reference.json: {where}{msg}")


def _int(obj: Mapping[str, Any], key: str, where: str, minimum: int = 0) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _err(where, f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _parse_feature(raw: Any, where: str, rows: int) -> FeatureRef:
    if not isinstance(raw, dict):
        raise _err(where, "must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _err(where, "name must be a non-empty string")
    where = f"{where[:-2]} ({name}): "
    kind = raw.get("kind")
    counts_raw = raw.get("counts")
    if not isinstance(counts_raw, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts_raw
    ):
        raise _err(where, "counts must be a list of integers >= 0")
    counts = tuple(counts_raw)
    if kind == "numeric":
        edges_raw = raw.get("edges")
        if not isinstance(edges_raw, list) or not edges_raw:
            raise _err(where, "edges must be a non-empty list of numbers")
        edges: list[float] = []
        for i, e in enumerate(edges_raw):
            if not isinstance(e, int | float) or isinstance(e, bool) or not math.isfinite(e):
                raise _err(where, f"edge {i} is {e!r}; edges must be finite numbers")
            if edges and float(e) <= edges[-1]:
                raise _err(
                    where,
                    f"edges must be strictly increasing, but edge {i} ({e!r}) follows "
                    f"{edges[-1]!r}",
                )
            edges.append(float(e))
        feature = FeatureRef(name, "numeric", counts, edges=tuple(edges))
    elif kind == "categorical":
        cats_raw = raw.get("categories")
        if not isinstance(cats_raw, list) or not all(
            isinstance(c, str) or (isinstance(c, int) and not isinstance(c, bool)) for c in cats_raw
        ):
            raise _err(where, "categories must be a list of strings or integers")
        if len({(type(c), c) for c in cats_raw}) != len(cats_raw):
            raise _err(where, "categories must not repeat")
        feature = FeatureRef(name, "categorical", counts, categories=tuple(cats_raw))
    else:
        raise _err(where, f"kind must be 'numeric' or 'categorical', got {kind!r}")
    if len(counts) != feature.slots:
        raise _err(where, f"has {len(counts)} counts, its bins need {feature.slots}")
    if sum(counts) != rows:
        raise _err(where, f"counts add up to {sum(counts)}, the reference has {rows} rows")
    return feature


def parse_reference(data: Any) -> Reference:
    """Validate a decoded reference.json; every problem names the tensor or feature."""
    if not isinstance(data, dict):
        raise _err("", "top level must be a JSON object")
    fmt = data.get("format")
    if fmt != REFERENCE_FORMAT:
        raise _err("", f"unsupported format {fmt!r} (this build reads {REFERENCE_FORMAT})")
    rows = _int(data, "rows", "", 1)
    bins = _int(data, "bins", "", 1)
    top_k = _int(data, "top_k", "", 1)
    source = data.get("source", "")
    if not isinstance(source, str):
        raise _err("", "source must be a string")
    tensors_raw = data.get("tensors")
    if not isinstance(tensors_raw, list) or not tensors_raw:
        raise _err("", "tensors must be a non-empty list")
    tensors: list[TensorRef] = []
    seen: set[str] = set()
    for ti, traw in enumerate(tensors_raw):
        where = f"tensors[{ti}]: "
        if not isinstance(traw, dict):
            raise _err(where, "must be an object")
        name = traw.get("tensor")
        if not isinstance(name, str) or not name:
            raise _err(where, "tensor must be a non-empty string")
        if name in {t.tensor for t in tensors}:
            raise _err(where, f"tensor {name!r} appears twice")
        where = f"tensors[{ti}] ({name}): "
        role, reduction = traw.get("role"), traw.get("reduction")
        if role not in ("input", "output"):
            raise _err(where, f"role must be 'input' or 'output', got {role!r}")
        if reduction not in ("columns", "summary"):
            raise _err(where, f"reduction must be 'columns' or 'summary', got {reduction!r}")
        width = _int(traw, "width", where)
        seed, dims = 0, 0
        if reduction == "summary":
            proj = traw.get("projection")
            if not isinstance(proj, dict):
                raise _err(where, "a summarised tensor needs a projection object")
            seed = _int(proj, "seed", where)
            dims = _int(proj, "dims", where)
            if dims and not width:
                raise _err(where, "a projection needs a fixed width")
        feats_raw = traw.get("features")
        if not isinstance(feats_raw, list) or not feats_raw:
            raise _err(where, "features must be a non-empty list")
        feats = tuple(
            _parse_feature(f, f"{where[:-2]}.features[{fi}]: ", rows)
            for fi, f in enumerate(feats_raw)
        )
        if reduction == "columns":
            if width > WIDE_FEATURES:
                raise _err(where, f"a columns tensor has at most {WIDE_FEATURES} features")
            if width != len(feats):
                raise _err(where, f"width is {width} but it lists {len(feats)} features")
        elif len(feats) != 2 + dims or any(f.kind != "numeric" for f in feats):
            raise _err(where, f"a summary has {2 + dims} numeric features (mean, std, projection)")
        for f in feats:
            if f.name in seen:
                raise _err(where, f"feature name {f.name!r} is used twice")
            seen.add(f.name)
        tensors.append(TensorRef(name, role, reduction, width, feats, seed, dims))
    return Reference(rows, tuple(tensors), bins, top_k, source)


# ---------------------------------------------------------------------------------------------
# Binning live values


class TensorBinner:
    """Bins rows of one tensor against its reference; vectorised over rows and features.

    Numeric features are binned all at once: the bin index is the number of edges a value is
    at or above, summed edge by edge over the whole [rows, features] block (edge lists padded
    with NaN, which compares false). For the ten-odd edges a feature has, that is ten numpy
    passes instead of one ``searchsorted`` call per feature, which dominates at a few hundred
    rows; longer edge lists use ``np.searchsorted`` per feature.
    """

    def __init__(self, ref: TensorRef) -> None:
        self.ref = ref
        feats = ref.features
        self.n = len(feats)
        self.offsets = np.zeros(self.n + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum([f.slots for f in feats])
        self.total = int(self.offsets[-1])
        self.numeric = np.array([i for i, f in enumerate(feats) if f.kind == "numeric"], np.int64)
        self.categorical = [i for i, f in enumerate(feats) if f.kind == "categorical"]
        self.all_numeric = len(self.numeric) == self.n
        m = max((len(feats[i].edges) for i in self.numeric), default=0)
        self.edges = np.full((len(self.numeric), m), np.nan)
        for row, i in enumerate(self.numeric):
            self.edges[row, : len(feats[i].edges)] = feats[i].edges
        self.num_base = self.offsets[self.numeric]
        self.num_missing = self.offsets[self.numeric + 1] - 1
        self.broadcast = m <= 32
        self._edge_cols = [np.ascontiguousarray(self.edges[:, j]) for j in range(m)]
        # The same edges for float32 values, each rounded up to the next float32: for a float32
        # x, x >= e exactly when x >= that rounded edge, so float32 rows are binned exactly as
        # in float64, without converting every value (NaN padding stays NaN).
        up = self.edges.astype(np.float32)
        low = up.astype(np.float64) < self.edges
        up[low] = np.nextafter(up[low], np.float32(np.inf))
        self._edge_cols32 = [np.ascontiguousarray(up[:, j]) for j in range(m)]
        self.cat_maps = [
            {c: k for k, c in enumerate(feats[i].categories)} for i in self.categorical
        ]
        # Integer categories of numeric rows are matched all at once too: a [rows, features,
        # categories] equality (padding NaN never matches); strings go through the dicts above.
        self.code_feats = np.array(
            [i for i in self.categorical if all(isinstance(c, int) for c in feats[i].categories)],
            dtype=np.int64,
        )
        kmax = max((len(feats[i].categories) for i in self.code_feats), default=0)
        self.codes = np.full((len(self.code_feats), max(kmax, 1)), np.nan)
        for row, i in enumerate(self.code_feats):
            self.codes[row, : len(feats[i].categories)] = feats[i].categories
        self.code_base = self.offsets[self.code_feats]
        self.code_other = self.offsets[self.code_feats + 1] - 2
        self.code_missing = self.offsets[self.code_feats + 1] - 1
        self.projection: npt.NDArray[np.float32] | None = None
        if ref.reduction == "summary" and ref.projection_dims:
            self.projection = projection_matrix(ref.projection_seed, ref.width, ref.projection_dims)

    @property
    def width(self) -> int:
        """Feature values per row that :meth:`features` returns."""
        return self.n

    def features(self, arr: np.ndarray) -> np.ndarray:
        """The feature matrix [rows, features] of a batch of this tensor."""
        if self.ref.reduction == "summary":
            return summary_features(arr, self.projection)
        flat = _rows_view(arr)
        if flat.shape[1] != self.n:
            raise BundleError(
                f"tensor {self.ref.tensor!r} has {flat.shape[1]} values per row, the reference "
                f"has {self.n} features"
            )
        return flat

    def count(self, feats: np.ndarray) -> list[IntArray]:
        """Per feature, the counts of these rows in its slots."""
        flat = self.count_flat(feats)
        return [flat[self.offsets[k] : self.offsets[k + 1]] for k in range(self.n)]

    def count_flat(self, feats: np.ndarray) -> IntArray:
        """All features' counts in one flat array (feature k at ``offsets[k]:offsets[k+1]``)."""
        out = np.zeros(self.total, dtype=np.int64)
        if feats.shape[0] == 0:
            return out
        if len(self.numeric):
            x = feats if self.all_numeric else feats[:, self.numeric]
            if x.dtype != np.float32 and x.dtype != np.float64:
                x = x.astype(np.float64)
            if self.broadcast:
                cols = self._edge_cols32 if x.dtype == np.float32 else self._edge_cols
                # uint8 suffices (at most 32 edges) and halves the memory traffic of int64.
                idx: np.ndarray = np.zeros(x.shape, dtype=np.uint8)
                for col in cols:
                    np.add(idx, x >= col, out=idx, casting="unsafe")
            else:
                idx = np.column_stack(
                    [
                        np.searchsorted(self.edges[j][~np.isnan(self.edges[j])], x[:, j], "right")
                        for j in range(x.shape[1])
                    ]
                )
            pos = idx + self.num_base
            missing = np.isnan(x)
            if missing.any():
                pos = np.where(missing, self.num_missing, pos)
            out += np.bincount(pos.ravel(), minlength=self.total)
        vectorised = len(self.code_feats) > 0 and feats.dtype.kind in "fiub"
        if vectorised:
            xc = feats[:, self.code_feats].astype(np.float64)
            eq = xc[:, :, None] == self.codes[None, :, :]
            pos = np.where(eq.any(axis=2), eq.argmax(axis=2) + self.code_base, self.code_other)
            missing = np.isnan(xc)
            if missing.any():
                pos = np.where(missing, self.code_missing, pos)
            out += np.bincount(pos.ravel(), minlength=self.total)
        done = set(self.code_feats.tolist()) if vectorised else set()
        for ci, k in enumerate(self.categorical):
            if k in done:
                continue
            feat = self.ref.features[k]
            base, other = int(self.offsets[k]), int(self.offsets[k]) + len(feat.categories)
            mapping = self.cat_maps[ci]
            col = feats[:, k]
            for v in col.tolist():
                if v is None or (isinstance(v, float) and v != v):
                    out[other + 1] += 1
                    continue
                if isinstance(v, float) and not v.is_integer():
                    out[other] += 1  # never equal to an integer category (inf included)
                    continue
                key = _category(v)
                out[base + mapping[key] if key in mapping else other] += 1
        return out


# ---------------------------------------------------------------------------------------------
# Scores


@dataclass(frozen=True)
class DriftScores:
    """One feature's live window against its reference."""

    tensor: str
    feature: str
    kind: Kind
    psi: float
    js: float
    # Binned KS (numeric features only, missing values left out); None for categories, which
    # have no order.
    ks: float | None
    rows: int
    reference_rows: int
    counts: tuple[int, ...]

    def flagged(self, threshold: float = PSI_ALERT) -> bool:
        return self.psi > threshold


def _proportions(counts: np.ndarray) -> FloatArray:
    total = counts.sum()
    return counts.astype(np.float64) / total if total else np.zeros(len(counts))


def psi(reference: Sequence[int] | np.ndarray, live: Sequence[int] | np.ndarray) -> float:
    """Population stability index, sum((l - r) * ln(l / r)) over bins.

    Proportions are smoothed as (c/n + eps) / (1 + k*eps) with eps = PSI_EPSILON, so an empty bin
    gives a finite term: a bin empty in the reference but holding a share p of live rows adds
    about p * ln(p / eps).
    """
    r, live_p = _proportions(np.asarray(reference)), _proportions(np.asarray(live))
    k = len(r)
    r = (r + PSI_EPSILON) / (1 + k * PSI_EPSILON)
    live_p = (live_p + PSI_EPSILON) / (1 + k * PSI_EPSILON)
    return float(np.sum((live_p - r) * np.log(live_p / r)))


def js_distance(reference: Sequence[int] | np.ndarray, live: Sequence[int] | np.ndarray) -> float:
    """Jensen-Shannon distance (square root of the divergence, log base 2): 0 to 1, no smoothing
    needed (an empty bin contributes 0)."""
    p, q = _proportions(np.asarray(reference)), _proportions(np.asarray(live))
    m = (p + q) / 2

    def kl(a: FloatArray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def ks_binned(reference: Sequence[int] | np.ndarray, live: Sequence[int] | np.ndarray) -> float:
    """Largest gap between the two cumulative distributions, evaluated at the bin edges only.

    The exact KS statistic is a supremum over all values; at the edges it is a lower bound that
    is exact when the distributions differ only between, not within, bins. Pass the ordered bins
    without the missing slot.
    """
    p, q = _proportions(np.asarray(reference)), _proportions(np.asarray(live))
    return float(np.max(np.abs(np.cumsum(p) - np.cumsum(q)))) if len(p) else 0.0


def score(
    tensor: str, feature: FeatureRef, live: Sequence[int] | np.ndarray, reference_rows: int
) -> DriftScores:
    live_arr = np.asarray(live, dtype=np.int64)
    if len(live_arr) != feature.slots:
        raise ValueError(f"{feature.name}: {len(live_arr)} live counts for {feature.slots} slots")
    rows = int(live_arr.sum())
    if rows == 0:
        raise ValueError(f"{feature.name}: no live rows to score")
    ref = np.asarray(feature.counts, dtype=np.int64)
    ks = ks_binned(ref[:-1], live_arr[:-1]) if feature.kind == "numeric" else None
    return DriftScores(
        tensor,
        feature.name,
        feature.kind,
        psi(ref, live_arr),
        js_distance(ref, live_arr),
        ks,
        rows,
        reference_rows,
        tuple(int(c) for c in live_arr),
    )


# ---------------------------------------------------------------------------------------------
# Per-window accumulation (what the agent keeps per model version)


@dataclass(frozen=True)
class WindowCounts:
    """What one window saw: per tensor the rows added and the flat counts of its features."""

    rows: Mapping[str, int]
    counts: Mapping[str, IntArray]
    offered: int = 0  # add() calls, sampled or not, for the caller's bookkeeping

    def scores(self, reference: Reference) -> list[DriftScores]:
        """Scores of every feature whose tensor had rows in this window."""
        out: list[DriftScores] = []
        for t in reference.tensors:
            flat = self.counts.get(t.tensor)
            if flat is None or not self.rows.get(t.tensor):
                continue
            pos = 0
            for f in t.features:
                out.append(score(t.tensor, f, flat[pos : pos + f.slots], reference.rows))
                pos += f.slots
        return out


@dataclass
class _Buffer:
    binner: TensorBinner
    summary: bool
    width: int  # values per row a columns tensor must have
    pending: list[np.ndarray] = field(default_factory=list)
    pending_rows: int = 0
    rows: int = 0
    counts: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class DriftWindow:
    """Accumulates live rows of a model version's inputs and outputs for one window at a time.

    ``add`` keeps a copy of the request's rows (a wide tensor's summary instead of its values)
    and bins them a thousand rows at a time, so the per-request cost is a small copy and a
    list append; ``snapshot`` bins what is pending, returns the window's counts and starts the
    next window. Thread-safe. Sampling is the caller's: add only the requests it picked.
    """

    def __init__(self, reference: Reference, *, buffer_rows: int = 1024) -> None:
        self.reference = reference
        self.buffer_rows = buffer_rows
        self._lock = threading.Lock()
        self._bufs: dict[str, _Buffer] = {}
        for t in reference.tensors:
            binner = TensorBinner(t)
            self._bufs[t.tensor] = _Buffer(
                binner,
                t.reduction == "summary",
                binner.width,
                counts=np.zeros(binner.total, dtype=np.int64),
            )
        self._offered = 0

    def add(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Count the rows of one request or batch; tensors the reference lacks are ignored.

        A columns tensor whose values per row differ from the reference's raises BundleError
        here, not later in another request's flush.
        """
        bufs = self._bufs
        with self._lock:
            self._offered += 1
            for name, arr in arrays.items():
                buf = bufs.get(name)
                if buf is None:
                    continue
                n = arr.shape[0] if arr.ndim else 1
                if buf.summary:
                    # A summary row is a dozen values: keep those, never a wide tensor.
                    buf.pending.append(buf.binner.features(arr))
                else:
                    if arr.size != n * buf.width:
                        buf.binner.features(arr)  # raises, naming the tensor and both widths
                    # A copy: the caller's buffers may be reused once the request is answered.
                    buf.pending.append(arr.reshape(n, buf.width).copy())
                buf.rows += n
                buf.pending_rows += n
                if buf.pending_rows >= self.buffer_rows:
                    self._flush(buf)

    @staticmethod
    def _flush(buf: _Buffer) -> None:
        if not buf.pending:
            return
        parts = buf.pending
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
        buf.counts += buf.binner.count_flat(block)
        buf.pending, buf.pending_rows = [], 0

    def snapshot(self) -> WindowCounts:
        """The window so far, and a fresh one from now on."""
        with self._lock:
            rows: dict[str, int] = {}
            counts: dict[str, IntArray] = {}
            for name, buf in self._bufs.items():
                self._flush(buf)
                rows[name], counts[name] = buf.rows, buf.counts
                buf.rows, buf.counts = 0, np.zeros(buf.binner.total, dtype=np.int64)
            offered, self._offered = self._offered, 0
        return WindowCounts(rows, counts, offered)
