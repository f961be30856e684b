"""The health gate: decides whether a candidate version may serve.

Pure functions over arrays and latencies (no sessions, no clocks), so every rule is unit-tested
directly; :mod:`agent.slots` runs the model and feeds the results in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from modelfleet.kernel.bundle import Manifest
from modelfleet.kernel.datatypes import NUMPY_BY_DATATYPE


@dataclass(frozen=True)
class GateResult:
    version: int
    passed: bool
    # Empty when passed; otherwise the first rule that failed, in words an operator can act on.
    reason: str
    # Short label for metrics: ok, missing_output, dtype, shape, non_finite, mismatch, latency,
    # load, bundle, runtime, provider.
    kind: str
    p99_ms: float | None = None
    at: float = 0.0
    # The fastest timed run: the model's own cost, which scheduler stalls only ever add to.
    min_ms: float | None = None


def check_outputs(
    manifest: Manifest,
    expected: Mapping[str, np.ndarray],
    observed: Mapping[str, np.ndarray],
) -> tuple[str, str] | None:
    """Return ``(kind, reason)`` for the first output rule that fails, or None."""
    rtol, atol = manifest.health.rtol, manifest.health.atol
    for spec in manifest.outputs:
        if spec.name not in observed or observed[spec.name] is None:
            return "missing_output", f"output {spec.name!r} is missing"
        got = np.asarray(observed[spec.name])
        want_dtype = NUMPY_BY_DATATYPE[spec.datatype]
        if spec.datatype == "BYTES":
            if got.dtype.kind not in ("O", "U", "S"):
                return "dtype", f"output {spec.name!r} has dtype {got.dtype}, declared BYTES"
        elif got.dtype != want_dtype:
            return (
                "dtype",
                f"output {spec.name!r} has dtype {got.dtype}, declared {spec.datatype}",
            )
        if len(got.shape) != len(spec.shape) or any(
            d != -1 and d != g for d, g in zip(spec.shape, got.shape, strict=False)
        ):
            return (
                "shape",
                f"output {spec.name!r} has shape {list(got.shape)}, declared {list(spec.shape)}",
            )
        if got.dtype.kind in ("f", "c") and not np.all(np.isfinite(got)):
            bad = int(np.size(got) - np.count_nonzero(np.isfinite(got)))
            return "non_finite", f"output {spec.name!r} has {bad} non-finite value(s) (NaN/Inf)"
        if spec.name not in expected:
            continue
        want = np.asarray(expected[spec.name])
        if want.shape != got.shape:
            return (
                "shape",
                f"output {spec.name!r} has shape {list(got.shape)}, expected {list(want.shape)}",
            )
        if got.dtype.kind in ("f", "c"):
            close = np.isclose(got, want.astype(got.dtype), rtol=rtol, atol=atol)
            if not np.all(close):
                idx = np.unravel_index(int(np.argmin(close)), close.shape)
                diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
                return (
                    "mismatch",
                    f"output {spec.name!r} differs from the expected output at index "
                    f"{list(map(int, idx))}: got {got[idx]!r}, expected {want[idx]!r} "
                    f"(max abs diff {diff:.3g}, rtol {rtol:g}, atol {atol:g})",
                )
        else:
            got_cmp = _normalise_strings(got)
            want_cmp = _normalise_strings(want)
            if not np.array_equal(got_cmp, want_cmp):
                return "mismatch", f"output {spec.name!r} differs from the expected output"
    return None


def _normalise_strings(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind in ("O", "S", "U"):
        normalised: np.ndarray = np.vectorize(
            lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v),
            otypes=[object],
        )(arr)
        return normalised
    return arr


def p99_ms(latencies_s: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(latencies_s, dtype=np.float64) * 1e3, 99))


def min_ms(latencies_s: Sequence[float]) -> float:
    return float(min(latencies_s)) * 1e3


def runs_inline(result: GateResult, inline_max_us: int) -> bool:
    """Whether a version that passed its gate runs on the event loop rather than the executor.

    Decided from the fastest gate run, not the p99: a p99 of a few runs measures how loaded the
    machine was while gating (a candidate gated beside a busy active version reads milliseconds
    of scheduler stalls), and that would put two copies of one model on different paths. Stalls
    only lengthen a run, so the fastest run is the model's cost whatever the load, and a model
    that truly takes longer than the limit never has a run under it.
    """
    return result.min_ms is not None and result.min_ms * 1000 < inline_max_us


def evaluate(
    manifest: Manifest,
    expected: Mapping[str, np.ndarray],
    observed: Mapping[str, np.ndarray],
    latencies_s: Sequence[float],
    *,
    at: float = 0.0,
) -> GateResult:
    """Apply every rule: outputs first (cheap to explain), then the latency budget."""
    version = manifest.version
    failure = check_outputs(manifest, expected, observed)
    p99 = p99_ms(latencies_s) if latencies_s else None
    fastest = min_ms(latencies_s) if latencies_s else None
    if failure is not None:
        kind, reason = failure
        return GateResult(version, False, reason, kind, p99, at, fastest)
    budget = manifest.health.latency_budget_ms
    if p99 is None:
        return GateResult(version, False, "no warm-up run was measured", "latency", None, at)
    if p99 > budget:
        return GateResult(
            version,
            False,
            f"p99 latency {p99:.3f} ms over {len(latencies_s)} warm-up runs exceeds the "
            f"budget of {budget:g} ms",
            "latency",
            p99,
            at,
            fastest,
        )
    return GateResult(version, True, "", "ok", p99, at, fastest)
