"""The benchmark's models, bundles and in-process onnxruntime baselines."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelfleet.kernel.bundle import create_bundle
from tests import models

SMALL = "small"
HEAVY = "heavy"
# 2048 wide, 2 hidden layers: 3 MatMuls over 50 MB of weights, more than the 32 MB L3 of the
# reference machine, so one row is bound by memory bandwidth (~1.2 ms in-process) while a batch
# of 16 costs little more than one row; that gap is what dynamic batching can win back.
HEAVY_WIDTH = 2048
HEAVY_LAYERS = 2
SMALL_IN, SMALL_HIDDEN, SMALL_OUT = 4, 16, 3


@dataclass(frozen=True)
class BenchModel:
    name: str
    onnx_path: Path
    width_in: int
    width_out: int

    def row(self, seed: int = 0) -> np.ndarray:
        """The one-row request every benchmark sends."""
        return np.random.default_rng(seed).standard_normal((1, self.width_in)).astype(np.float32)

    def rows(self, n: int, seed: int = 1) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((n, self.width_in)).astype(np.float32)

    def echo_spec(self, version: int = 1) -> dict:
        """Layout of the agent's response to one row, for the echo server."""
        return {
            "model_version": str(version),
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, self.width_out]}],
            # For clients that read the signature first (perf_analyzer); batch dimension first.
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, self.width_in]}],
            "max_batch_size": 32,
        }


def build_models(onnx_dir: Path) -> dict[str, BenchModel]:
    small = models.mlp(
        onnx_dir / "small.onnx", inputs=SMALL_IN, hidden=SMALL_HIDDEN, outputs=SMALL_OUT
    )
    heavy = models.heavy(onnx_dir / "heavy.onnx", width=HEAVY_WIDTH, layers=HEAVY_LAYERS)
    return {
        SMALL: BenchModel(SMALL, small, SMALL_IN, SMALL_OUT),
        HEAVY: BenchModel(HEAVY, heavy, HEAVY_WIDTH, HEAVY_WIDTH),
    }


def make_bundle(
    model: BenchModel, repo: Path, version: int = 1, onnx_path: Path | None = None
) -> Path:
    # A wide MatMul may sum in a different order with another thread count; the gate's default
    # 1e-4 tolerance is for the numbers, not for the benchmark, so give it room.
    bundle = create_bundle(
        onnx_path or model.onnx_path,
        name=model.name,
        version=version,
        samples={"x": model.rows(4)},
        out_dir=repo,
        rtol=1e-3,
        atol=1e-4,
    )
    return bundle.path


def stage_versions(model: BenchModel, onnx_dir: Path, staging: Path, versions: range) -> list[Path]:
    """Bundles of ``model`` for each version, weights differing, ready to be renamed in."""
    out = []
    for v in versions:
        path = models.mlp(
            onnx_dir / f"{model.name}-v{v}.onnx",
            inputs=SMALL_IN,
            hidden=SMALL_HIDDEN,
            outputs=SMALL_OUT,
            seed=v,
        )
        out.append(make_bundle(model, staging, v, path))
    return out


@dataclass(frozen=True)
class InProcess:
    p50_ms: float
    p99_ms: float
    runs: int


def ort_call(model: BenchModel, rows: int = 1) -> Callable[[], object]:
    """One Session.run on ``rows`` rows, with the session options the agent uses by default."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 0
    so.inter_op_num_threads = 0
    so.log_severity_level = 3
    session = ort.InferenceSession(str(model.onnx_path), so, providers=["CPUExecutionProvider"])
    feed = {"x": model.row() if rows == 1 else model.rows(rows)}
    return lambda: session.run(["y"], feed)


def ort_latency(model: BenchModel, rows: int = 1, runs: int = 1000, warmup: int = 50) -> InProcess:
    run = ort_call(model, rows)
    for _ in range(warmup):
        run()
    lat = np.empty(runs, dtype=np.int64)
    for i in range(runs):
        start = time.perf_counter_ns()
        run()
        lat[i] = time.perf_counter_ns() - start
    return InProcess(float(np.percentile(lat, 50)) / 1e6, float(np.percentile(lat, 99)) / 1e6, runs)
