"""Batch scoring benchmark: ``.venv/bin/python -m tests.benchmarks.batch_bench`` (~2 minutes).

Figures, each beside its baseline (all measured in this one run, on the same rows):

1. Throughput on 2,000,000 rows x 32 float32 feature columns (one Parquet file, row groups of
   131,072 rows, written once into a temporary folder), model: MLP 32 -> 128 -> 128 -> 1:
   - raw onnxruntime: the same rows already in memory as one float32 array, same batch size;
     the better of a default session (onnxruntime picks its intra-op threads) and the engine's
     own threading (one single-threaded call per core at once);
   - plain loop: read a batch with pyarrow, stack the columns, run, write, one step after the
     other, with the same session and the engine's writer settings (so the ratio measures the
     pipeline, not tuning);
   - the engine: ``modelfleet-batch score`` in a subprocess, rows/s from its summary (bundle
     verification and session creation included, interpreter start-up excluded).
   The three alternate for ``ROUNDS`` rounds and the best round of each counts, because the
   reference machine is shared and a single round can be slowed by a neighbour.
2. Peak RSS (VmHWM) of the scoring subprocess at 1x and 10x input: 2,000,000 rows vs
   20,000,000 rows (the 1x file hard-linked ten times into a folder: no extra disk, no extra
   generation time, about 15 s of scoring). The same pair at 300,000 / 3,000,000 rows is printed
   too: below ~1M rows a run ends before its allocators reach their steady state, so small runs
   read lower and the ratio overstates growth.

Targets: engine >= 0.5 x raw onnxruntime, >= 1.5 x the plain loop, RSS(10x) <= 1.25 x RSS(1x).
Missed targets print MISS; the exit status is 0 unless something fails to run.

Why this model: on a machine with C cores the pipeline can beat the plain loop by at most about
(ORT + I/O) / max(ORT, I/O) per row, while raw onnxruntime sets the ceiling ORT alone. Both
targets need the model's cost per row to be comparable to the Parquet read + write cost (about
0.35 CPU-us per row here); a 32-64-64-1 MLP is cheaper than I/O (I/O-bound: misses the raw
onnxruntime target), a much heavier one makes every approach equal to raw onnxruntime.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq

from modelfleet.batch.engine import available_cpus
from modelfleet.kernel.bundle import create_bundle
from modelfleet.kernel.malloc import tune_malloc
from tests import models
from tests.procs import ROOT

ROWS = 2_000_000
SMALL_ROWS = 300_000
COPIES = 10
FEATURES = 32
HIDDEN = 128
LAYERS = 2
ROW_GROUP = 131_072
BATCH_ROWS = 16_384
ROUNDS = 5

RAW_RATIO_MIN = 0.5
PLAIN_RATIO_MIN = 1.5
RSS_RATIO_MAX = 1.25

NAMES = [f"f{i}" for i in range(FEATURES)]


def write_input(path: Path, rows: int, seed: int = 0) -> None:
    """Rows id, f0..f31 (float32), written in slices so generating them stays small too."""
    rng = np.random.default_rng(seed)
    writer = None
    for start in range(0, rows, ROW_GROUP):
        n = min(ROW_GROUP, rows - start)
        x = rng.standard_normal((n, FEATURES), dtype=np.float32)
        cols = {"id": pa.array(np.arange(start, start + n, dtype=np.int64))}
        cols.update({name: pa.array(x[:, i]) for i, name in enumerate(NAMES)})
        table = pa.table(cols)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=ROW_GROUP)
    assert writer is not None
    writer.close()


def read_matrix(path: Path) -> np.ndarray:
    table = pq.read_table(path, columns=NAMES)
    out = np.empty((table.num_rows, FEATURES), dtype=np.float32)
    for i, name in enumerate(NAMES):
        out[:, i] = table.column(name).to_numpy()
    return out


def session(model: Path, intra_op_threads: int = 0) -> ort.InferenceSession:
    # 0: onnxruntime picks the intra-op threads.
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])


def raw_onnxruntime(sess: ort.InferenceSession, x: np.ndarray) -> float:
    """One call after the other on a default session (onnxruntime's intra-op threads)."""
    start = time.perf_counter()
    for i in range(0, len(x), BATCH_ROWS):
        sess.run(None, {"x": x[i : i + BATCH_ROWS]})
    return len(x) / (time.perf_counter() - start)


def raw_onnxruntime_concurrent(sess: ort.InferenceSession, x: np.ndarray) -> float:
    """The engine's threading without the I/O: one call per core at once, one thread each."""
    starts = range(0, len(x), BATCH_ROWS)
    start = time.perf_counter()
    with ThreadPoolExecutor(available_cpus()) as pool:
        list(pool.map(lambda i: sess.run(None, {"x": x[i : i + BATCH_ROWS]}), starts))
    return len(x) / (time.perf_counter() - start)


def plain_loop(sess: ort.InferenceSession, path: Path, out: Path) -> float:
    """The obvious single-threaded job: read, stack, run, write, repeat."""
    start = time.perf_counter()
    writer = None
    rows = 0
    # pre_buffer=False: with it, pyarrow buffers the column chunks of every row group it is
    # asked for (here the whole file), which made this loop 1.5x slower and 2x bigger.
    reader = pq.ParquetFile(path, pre_buffer=False)
    # Whole row groups decoded at once and sliced, as the engine reads them (its row groups are
    # small enough): the ratio is about the pipeline, not about the read call.
    batches = (
        batch
        for rg in range(reader.num_row_groups)
        for batch in reader.read_row_group(rg, columns=["id", *NAMES]).to_batches(BATCH_ROWS)
    )
    for batch in batches:
        x = np.empty((batch.num_rows, FEATURES), dtype=np.float32)
        for i, name in enumerate(NAMES):
            x[:, i] = batch.column(name).to_numpy()
        y = sess.run(None, {"x": x})[0]
        n = batch.num_rows
        table = pa.table(
            {
                "id": batch.column("id"),
                "y": pa.array(y.reshape(-1)),
                "model_name": pa.repeat(pa.scalar("bench", pa.string()), n),
                "model_version": pa.repeat(pa.scalar(1, pa.int64()), n),
                "run_id": pa.repeat(pa.scalar("plain", pa.string()), n),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(
                out, table.schema, use_dictionary=["model_name", "model_version", "run_id"]
            )
        writer.write_table(table)
        rows += n
    assert writer is not None
    writer.close()
    return rows / (time.perf_counter() - start)


# Runs the CLI in the child and then reports the child's own peak RSS. VmHWM belongs to the
# address space created by exec, so it is the scorer's alone; rusage maxrss (even from wait4)
# would also count the pages the child shared with this big parent between fork and exec.
_CHILD = """
import sys
from modelfleet.batch.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as fh:
    hwm = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
print(f"VmHWM_KIB={hwm}", file=sys.stderr)
sys.exit(code)
"""


def engine(bundle: Path, inp: Path, out: Path, run_id: str) -> tuple[dict[str, Any], float]:
    """``modelfleet-batch score`` as a subprocess: its summary and its peak RSS in MiB."""
    cmd = [
        sys.executable,
        "-c",
        _CHILD,
        "score",
        "--model",
        str(bundle),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--keys",
        "id",
        "--batch-rows",
        str(BATCH_ROWS),
        "--run-id",
        run_id,
    ]
    env = {**os.environ, "MODELFLEET_PROGRESS": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"modelfleet-batch score failed ({proc.returncode}): {proc.stderr}")
    summary = json.loads(proc.stdout)
    hwm = next(line for line in proc.stderr.splitlines() if line.startswith("VmHWM_KIB="))
    shutil.rmtree(out, ignore_errors=True)
    return summary, int(hwm.split("=")[1]) / 1024


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> dict[str, Any]:
    # The engine's CLI tunes glibc malloc (kernel/malloc.py); the baselines run in this process
    # and get the same, so the ratios compare pipelines, not allocators.
    tune_malloc()
    figures: dict[str, Any] = {
        "rows": ROWS,
        "features": FEATURES,
        "cpus": os.cpu_count(),
        "model": f"mlp {FEATURES}-{HIDDEN}x{LAYERS}-1",
        "batch_rows": BATCH_ROWS,
    }
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        onnx = models.mlp(
            tmp / "model.onnx", inputs=FEATURES, hidden=HIDDEN, outputs=1, layers=LAYERS
        )
        sample = {"x": np.zeros((4, FEATURES), dtype=np.float32)}
        bundle = create_bundle(
            onnx,
            name="bench",
            version=1,
            samples=sample,
            out_dir=tmp / "bundles",
            feature_names=tuple(NAMES),
        ).path
        big = tmp / "big.parquet"
        write_input(big, ROWS)
        small = tmp / "small.parquet"
        write_input(small, SMALL_ROWS, seed=1)
        # 10x inputs cost no disk and no generation time: the same file hard-linked ten times.
        ten_big, ten_small = _copies(big, tmp / "big-x10"), _copies(small, tmp / "small-x10")
        print(
            f"inputs written in {time.perf_counter() - t0:.1f} s "
            f"({big.stat().st_size / 2**20:.0f} MiB for {ROWS:,} rows)",
            flush=True,
        )

        sess = session(onnx)
        single = session(onnx, intra_op_threads=1)
        x = read_matrix(big)
        for s in (sess, single):
            s.run(None, {"x": x[:BATCH_ROWS]})  # warm-up
        best = {"raw": 0.0, "plain": 0.0, "engine": 0.0}
        per_round: list[tuple[float, float]] = []
        rss_1x = 0.0
        for r in range(ROUNDS):
            # The stricter of the two ways to run onnxruntime on this machine.
            raw = max(raw_onnxruntime(sess, x), raw_onnxruntime_concurrent(single, x))
            plain = plain_loop(sess, big, tmp / "plain.parquet")
            summary, rss = engine(bundle, big, tmp / "out", f"bench{r}")
            assert summary["rows_out"] == ROWS
            eng = summary["rows_per_s"]
            rss_1x = max(rss_1x, rss)
            per_round.append((eng / raw, eng / plain))
            print(
                f"round {r + 1}: raw onnxruntime {raw:,.0f} rows/s, plain loop {plain:,.0f}, "
                f"engine {eng:,.0f} (peak RSS {rss:.0f} MiB)",
                flush=True,
            )
            best = {
                k: max(best[k], v) for k, v in (("raw", raw), ("plain", plain), ("engine", eng))
            }
        del x
        summary, rss_10x = engine(bundle, ten_big, tmp / "out", "rss10")
        assert summary["rows_out"] == ROWS * COPIES
        _, rss_small = engine(bundle, small, tmp / "out", "rss-small")
        _, rss_small_10x = engine(bundle, ten_small, tmp / "out", "rss-small10")
        print(f"10x run: {summary['rows_per_s']:,.0f} rows/s", flush=True)

    ratio_raw = best["engine"] / best["raw"]
    ratio_plain = best["engine"] / best["plain"]
    ratio_rss = rss_10x / rss_1x
    figures.update(
        {
            "raw_onnxruntime_rows_per_s": round(best["raw"]),
            "plain_loop_rows_per_s": round(best["plain"]),
            "engine_rows_per_s": round(best["engine"]),
            "engine_vs_raw": round(ratio_raw, 3),
            "engine_vs_plain": round(ratio_plain, 3),
            # Context for a noisy machine: the three runs of a round are seconds apart.
            "median_round_engine_vs_raw": round(statistics.median(r for r, _ in per_round), 3),
            "median_round_engine_vs_plain": round(statistics.median(p for _, p in per_round), 3),
            "rss_mib_1x": round(rss_1x, 1),
            "rss_mib_10x": round(rss_10x, 1),
            "rss_10x_vs_1x": round(ratio_rss, 3),
            "rss_mib_small": round(rss_small, 1),
            "rss_mib_small_10x": round(rss_small_10x, 1),
            "verdicts": {
                "engine_vs_raw": _verdict(ratio_raw >= RAW_RATIO_MIN),
                "engine_vs_plain": _verdict(ratio_plain >= PLAIN_RATIO_MIN),
                "rss_flat": _verdict(ratio_rss <= RSS_RATIO_MAX),
            },
        }
    )
    v = figures["verdicts"]
    print()
    print(
        f"engine {best['engine']:,.0f} rows/s vs raw onnxruntime {best['raw']:,.0f}: "
        f"{ratio_raw:.2f}x (target >= {RAW_RATIO_MIN}) {v['engine_vs_raw']}"
    )
    print(
        f"engine {best['engine']:,.0f} rows/s vs plain loop {best['plain']:,.0f}: "
        f"{ratio_plain:.2f}x (target >= {PLAIN_RATIO_MIN}) {v['engine_vs_plain']}"
    )
    print(
        f"(median of per-round ratios: {figures['median_round_engine_vs_raw']:.2f}x raw, "
        f"{figures['median_round_engine_vs_plain']:.2f}x plain)"
    )
    print(
        f"peak RSS {rss_10x:.0f} MiB at {ROWS * COPIES:,} rows vs {rss_1x:.0f} MiB at "
        f"{ROWS:,} rows: {ratio_rss:.2f}x (target <= {RSS_RATIO_MAX}) {v['rss_flat']}"
    )
    print(
        f"(small inputs, still warming up: {rss_small:.0f} MiB at {SMALL_ROWS:,} rows, "
        f"{rss_small_10x:.0f} MiB at {SMALL_ROWS * COPIES:,})"
    )
    return figures


def _copies(path: Path, folder: Path) -> Path:
    folder.mkdir()
    for i in range(COPIES):
        os.link(path, folder / f"part-{i}.parquet")
    return folder


if __name__ == "__main__":
    result = main()
    print(json.dumps(result, indent=2))
