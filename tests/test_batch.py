"""Batch scoring (``batch.engine`` and ``modelfleet-batch score``) on real Parquet and ONNX.

Every expected score is computed here with in-process onnxruntime on the same rows, in the same
batches, so outputs are compared exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from onnx import helper, numpy_helper

from modelfleet.batch import cli
from modelfleet.batch.checkpoint import RunConflictError, RunDir
from modelfleet.batch.engine import ScoreConfig, ScoreSummary, score
from modelfleet.kernel.bundle import Bundle, create_bundle
from modelfleet.kernel.errors import EXIT_CODES, InferenceError, InvalidRequestError, Status
from tests import models
from tests.procs import ROOT

WIDTH = 4
FEATURES = tuple(f"f{i}" for i in range(WIDTH))


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    root = tmp_path_factory.mktemp("bundles")
    x = np.random.default_rng(0).standard_normal((4, WIDTH)).astype(np.float32)
    mlp = models.mlp(root / "src/mlp.onnx", inputs=WIDTH, hidden=16, outputs=3)
    # One output value per row: written as a scalar column, not a list.
    score1 = models.mlp(root / "src/score1.onnx", inputs=WIDTH, hidden=8, outputs=1, seed=3)
    two = models.two_inputs(root / "src/two.onnx")
    # Slow enough per row that a subprocess can be killed part-way through a run.
    slow = models.mlp(root / "src/slow.onnx", inputs=WIDTH, hidden=512, outputs=2, layers=3)
    xs = {"x": x}
    vec = _vector_model(root / "src/vec.onnx")
    reshape = models.reshape_model(root / "src/reshape.onnx")
    return {
        "mlp": create_bundle(
            mlp, name="mlp", version=3, samples=xs, out_dir=root, feature_names=FEATURES
        ),
        "score1": create_bundle(score1, name="score1", version=1, samples=xs, out_dir=root),
        "two": create_bundle(
            two, name="two", version=1, out_dir=root, samples={"a": x[:, :2], "b": x[:, 2:]}
        ),
        "slow": create_bundle(slow, name="slow", version=1, samples=xs, out_dir=root),
        "vec": create_bundle(vec, name="vec", version=1, samples={"x": x[:, 0]}, out_dir=root),
        "reshape": create_bundle(
            reshape, name="reshape", version=1, samples={"x": x[:3]}, out_dir=root
        ),
    }


def _vector_model(path: Path) -> Path:
    """x[N] -> y[N] = 2x: a model input that is one scalar per row."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "vec",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N"])],
        initializer=[numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def features(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, WIDTH)).astype(np.float32)


def make_table(x: np.ndarray, *, layout: str, first_id: int = 0) -> pa.Table:
    """``scalar``: columns f0..f3; ``list``: a fixed-size list column x; ``varlist``: a
    variable-length list column x (what DuckDB writes)."""
    n = len(x)
    cols: dict[str, pa.Array] = {
        "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "name": pa.array([f"row-{i}" for i in range(first_id, first_id + n)]),
    }
    if layout == "scalar":
        cols.update({f: pa.array(x[:, i]) for i, f in enumerate(FEATURES)})
    elif layout == "list":
        cols["x"] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), WIDTH)
    else:
        offsets = pa.array(np.arange(0, n * WIDTH + 1, WIDTH, dtype=np.int32))
        cols["x"] = pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))
    return pa.table(cols)


def write(path: Path, table: pa.Table, row_group_size: int = 250) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def reference(bundle: Bundle, x: np.ndarray, batch_rows: int, output: str = "y") -> np.ndarray:
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    chunks = [
        session.run([output], {"x": x[i : i + batch_rows]})[0] for i in range(0, len(x), batch_rows)
    ]
    return np.concatenate(chunks)


def read_output(summary: ScoreSummary) -> pa.Table:
    parts = sorted(Path(summary.output_path).glob("part-*.parquet"))
    assert len(parts) == summary.parts
    return pa.concat_tables([pq.read_table(p) for p in parts])


def scores(table: pa.Table, column: str = "y") -> np.ndarray:
    col = table.column(column).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col.values.to_numpy().reshape(len(col), col.type.list_size)
    return col.to_numpy()


def config(bundle: Bundle, inp: Path | str, out: Path, **kwargs: object) -> ScoreConfig:
    base: dict[str, object] = {"batch_rows": 100, "unit_rows": 300, "progress": False}
    base.update(kwargs)
    return ScoreConfig(model=bundle.path, input=str(inp), output=out, **base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Outputs


@pytest.mark.parametrize("layout", ["list", "varlist", "scalar"])
def test_outputs_match_onnxruntime(bundles: dict[str, Bundle], tmp_path: Path, layout: str) -> None:
    """A folder of two files (several row groups each) in either column layout."""
    bundle = bundles["mlp"]
    x = features(1700)
    write(tmp_path / "in/a.parquet", make_table(x[:1000], layout=layout))
    write(tmp_path / "in/sub/b.parquet", make_table(x[1000:], layout=layout, first_id=1000))
    write(tmp_path / "in/_ignored.parquet", make_table(x[:5], layout=layout))
    summary = score(config(bundle, tmp_path / "in", tmp_path / "out", keys=("id", "name")))

    # Units: file a = row groups of 250 cut every >= 300 rows: 500, 500; file b: 500, 200.
    assert (summary.rows_in, summary.rows_out, summary.rows_rejected) == (1700, 1700, 0)
    assert summary.parts == 4 and summary.rejected_path is None
    out = read_output(summary)
    assert out.column_names == ["id", "name", "y", "model_name", "model_version", "run_id"]
    assert out.schema.field("y").type == pa.list_(pa.float32(), 3)
    assert out.column("id").to_pylist() == list(range(1700))
    assert out.column("name").to_pylist()[:2] == ["row-0", "row-1"]
    # Batches never straddle row groups (250) or units, so score them as the engine did.
    expected = np.concatenate([reference(bundle, x[i : i + 250], 100) for i in range(0, 1700, 250)])
    np.testing.assert_array_equal(scores(out), expected)
    assert set(out.column("model_name").to_pylist()) == {"mlp"}
    assert set(out.column("model_version").to_pylist()) == {3}
    assert set(out.column("run_id").to_pylist()) == {summary.run_id}
    marker = json.loads((Path(summary.output_path) / "_SUCCESS").read_text())
    assert marker["rows_out"] == 1700 and marker["run_id"] == summary.run_id
    # The committed folder holds only the parts and the marker.
    names = sorted(p.name for p in Path(summary.output_path).iterdir())
    assert names == ["_SUCCESS", *(f"part-{i:05d}.parquet" for i in range(4))]
    assert not list((tmp_path / "out").glob(".run-*"))


def test_scalar_output_and_explicit_features(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    """--features maps renamed scalar columns; a one-value output is a scalar column."""
    bundle = bundles["score1"]  # no feature_names in its manifest
    x = features(450, seed=2)
    table = make_table(x, layout="scalar").rename_columns(["id", "name", "d", "c", "b", "a"])
    write(tmp_path / "in.parquet", table)
    summary = score(
        config(bundle, tmp_path / "in.parquet", tmp_path / "out", features=("d", "c", "b", "a"))
    )
    out = read_output(summary)
    assert out.schema.field("y").type == pa.float32()
    assert out.column_names == ["y", "model_name", "model_version", "run_id"]  # no keys asked
    expected = np.concatenate([reference(bundle, x[i : i + 250], 100) for i in (0, 250)])
    np.testing.assert_array_equal(scores(out), expected[:, 0])


def test_scalar_input_column(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    x = features(120)[:, 0].copy()
    write(tmp_path / "in.parquet", pa.table({"x": x, "xd": x.astype(np.float64)}))
    summary = score(config(bundles["vec"], tmp_path / "in.parquet", tmp_path / "out"))
    np.testing.assert_array_equal(scores(read_output(summary)), x * 2)
    with pytest.raises(InvalidRequestError, match=r"column 'x' is double.*CAST\(x AS FLOAT\)"):
        score(
            config(
                bundles["vec"],
                tmp_path / "in.parquet",
                tmp_path / "o2",
                sql="SELECT xd AS x FROM input",
            )
        )


def test_model_changing_the_row_count_fails(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    """x[N, 4] -> y[4N/3, 3]: rows cannot be matched to scores, so the run stops."""
    write(tmp_path / "in.parquet", make_table(features(90), layout="list"))
    cfg = config(bundles["reshape"], tmp_path / "in.parquet", tmp_path / "out", batch_rows=30)
    with pytest.raises(InferenceError, match="one output row per input row"):
        score(cfg)
    assert not list((tmp_path / "out").iterdir())


def test_two_inputs_from_list_columns(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    a = features(300, seed=3)[:, :2].copy()
    b = features(300, seed=4)[:, :2].copy()
    table = pa.table(
        {
            "k": pa.array(np.arange(300)),
            "a": pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), 2),
            "b": pa.FixedSizeListArray.from_arrays(pa.array(b.reshape(-1)), 2),
        }
    )
    write(tmp_path / "in.parquet", table)
    summary = score(config(bundles["two"], tmp_path / "in.parquet", tmp_path / "out", keys=("k",)))
    out = read_output(summary)
    np.testing.assert_array_equal(scores(out, "sum"), a + b)
    np.testing.assert_array_equal(scores(out, "prod"), a * b)
    with pytest.raises(InvalidRequestError, match="exactly one input"):
        score(config(bundles["two"], tmp_path / "in.parquet", tmp_path / "o2", features=("a",)))


def test_sql_filters_and_transforms(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    bundle = bundles["mlp"]
    x = features(1000, seed=5)
    write(tmp_path / "in/a.parquet", make_table(x[:600], layout="scalar"))
    write(tmp_path / "in/b.parquet", make_table(x[600:], layout="scalar", first_id=600))
    sql = "SELECT id, f0 * 2 AS f0, f1, f2, f3 FROM input WHERE id % 3 = 0 ORDER BY id DESC"
    summary = score(
        config(bundle, str(tmp_path / "in/*.parquet"), tmp_path / "out", sql=sql, keys=("id",))
    )
    ids = np.arange(999, -1, -1)
    ids = ids[ids % 3 == 0]
    assert summary.rows_in == summary.rows_out == len(ids) == 334
    # SQL units are whole batches: 300 rows -> parts of 300, 34.
    assert summary.parts == 2
    out = read_output(summary)
    assert out.column("id").to_pylist() == ids.tolist()
    xt = x[ids].copy()
    xt[:, 0] *= 2
    np.testing.assert_array_equal(scores(out), reference(bundle, xt, 100))


def test_sql_matching_no_rows_commits_an_empty_part(
    bundles: dict[str, Bundle], tmp_path: Path
) -> None:
    write(tmp_path / "in.parquet", make_table(features(50), layout="list"))
    summary = score(
        config(
            bundles["mlp"],
            tmp_path / "in.parquet",
            tmp_path / "out",
            sql="SELECT * FROM input WHERE id < 0",
            keys=("id",),
        )
    )
    assert (summary.rows_in, summary.parts) == (0, 1)
    out = read_output(summary)
    assert out.num_rows == 0 and out.column_names[:2] == ["id", "y"]


def test_bad_arguments_leave_nothing_behind(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    write(tmp_path / "in.parquet", make_table(features(10), layout="list"))
    out = tmp_path / "out"
    cases = [
        ({"keys": ("nope",)}, "key column 'nope'"),
        ({"features": ("f0", "f1")}, "2 columns"),
        ({"sql": "SELEC 1"}, "--sql"),
        ({"keys": ("y",), "sql": "SELECT x, id AS y FROM input"}, "would appear twice"),
        ({"on_error": "ignore"}, "--on-error"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            score(config(bundles["mlp"], tmp_path / "in.parquet", out, **kwargs))
    assert not out.exists() or not list(out.iterdir())


# ---------------------------------------------------------------------------------------------
# Bad data


def _bad_table(case: str, n: int = 400) -> pa.Table:
    """Rows 0-399; the damage is in rows 10 and 17 (row-level cases)."""
    table = make_table(features(n, seed=6), layout="list" if "list" in case else "scalar")
    if case == "missing column":
        return table.drop_columns(["f2"])
    if case == "wrong type":
        return table.set_column(4, "f2", table.column("f2").cast(pa.float64()))
    if case == "null scalar":
        f2 = table.column("f2").to_pylist()
        f2[10] = f2[17] = None
        return table.set_column(4, "f2", pa.array(f2, pa.float32()))
    if case == "null list":
        x = table.column("x").to_pylist()
        x[10] = None
        x[17][1] = None
        return table.set_column(2, "x", pa.array(x, pa.list_(pa.float32(), WIDTH)))
    if case == "short varlist":
        x = table.column("x").to_pylist()
        x[10] = x[10][:3]
        x[17] = [*x[17], 1.0]
        return table.set_column(2, "x", pa.array(x, pa.list_(pa.float32())))
    raise AssertionError(case)


BAD_CASES = {
    # case: (message naming the column, rows rejected under skip)
    "missing column": ("missing column 'f2'", 400),
    "wrong type": ("column 'f2' is double", 400),
    "null scalar": ("column 'f2' is null", 2),
    "null list": ("column 'x'", 2),
    "short varlist": ("column 'x' holds a list of the wrong length", 2),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_data_fails_naming_the_column(
    bundles: dict[str, Bundle], tmp_path: Path, case: str, capsys: pytest.CaptureFixture
) -> None:
    message, _ = BAD_CASES[case]
    write(tmp_path / "in.parquet", _bad_table(case))
    with pytest.raises(InvalidRequestError, match=message):
        score(config(bundles["mlp"], tmp_path / "in.parquet", tmp_path / "out"))
    # The CLI maps it to the invalid-argument exit code, with the same message.
    argv = [
        "score",
        "--model",
        str(bundles["mlp"].path),
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "out"),
        "--batch-rows",
        "100",
    ]
    assert cli.main(argv) == EXIT_CODES[Status.INVALID_ARGUMENT]
    assert message in capsys.readouterr().err
    # The bad rows are in the first unit: nothing was committed, so nothing is left.
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_data_skipped_to_rejected_file(
    bundles: dict[str, Bundle], tmp_path: Path, case: str
) -> None:
    message, rejected = BAD_CASES[case]
    # A clean file beside the damaged one: its rows are scored either way.
    good_x = features(300, seed=7)
    layout = "list" if "list" in case else "scalar"
    write(tmp_path / "in/a.parquet", _bad_table(case))
    write(tmp_path / "in/b.parquet", make_table(good_x, layout=layout, first_id=400))
    summary = score(
        config(
            bundles["mlp"],
            tmp_path / "in",
            tmp_path / "out",
            keys=("id",),
            on_error="skip",
            run_id="skip1",
        )
    )
    assert (summary.rows_in, summary.rows_rejected) == (700, rejected)
    assert summary.rows_out == 700 - rejected
    assert summary.rejected_path == str(tmp_path / "out/rejected-skip1.parquet")
    bad = pq.read_table(summary.rejected_path)
    assert bad.column_names == ["id", "source", "row", "reason"]
    assert all(message in r for r in bad.column("reason").to_pylist())
    assert set(bad.column("source").to_pylist()) == {str((tmp_path / "in/a.parquet").resolve())}
    if rejected == 2:
        assert bad.column("id").to_pylist() == [10, 17]
        assert bad.column("row").to_pylist() == [10, 17]
    else:
        assert bad.column("row").to_pylist() == list(range(400))
    out = read_output(summary)
    kept = [i for i in range(400) if rejected == 2 and i not in (10, 17)] + list(range(400, 700))
    assert out.column("id").to_pylist() == kept
    # The good file's rows score exactly as they would alone.
    good = out.filter(pa.compute.greater_equal(out.column("id"), 400))
    expected = np.concatenate(
        [reference(bundles["mlp"], good_x[:250], 100), reference(bundles["mlp"], good_x[250:], 100)]
    )
    np.testing.assert_array_equal(scores(good), expected)


# ---------------------------------------------------------------------------------------------
# Checkpoint, resume, atomic commit


class _Crash(Exception):
    pass


def _crash_after(monkeypatch: pytest.MonkeyPatch, units: int) -> None:
    """Make the writer die after ``units`` commits, as if the process were killed there."""
    real = RunDir.commit_unit
    count = {"n": 0}

    def commit(self: RunDir, record: object) -> None:
        if count["n"] == units:
            raise _Crash
        count["n"] += 1
        real(self, record)  # type: ignore[arg-type]

    monkeypatch.setattr(RunDir, "commit_unit", commit)


@pytest.mark.parametrize("sql", [None, "SELECT * FROM input ORDER BY id"])
def test_resume_skips_committed_units(
    bundles: dict[str, Bundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sql: str | None
) -> None:
    write(tmp_path / "in.parquet", make_table(features(1500, seed=8), layout="list"))
    cfg = config(
        bundles["mlp"],
        tmp_path / "in.parquet",
        tmp_path / "out",
        keys=("id",),
        sql=sql,
        run_id="r1",
    )
    clean = read_output(
        score(
            config(bundles["mlp"], tmp_path / "in.parquet", tmp_path / "ref", keys=("id",), sql=sql)
        )
    )
    with monkeypatch.context() as m:
        _crash_after(m, 2)
        with pytest.raises(_Crash):
            score(cfg)
    work = tmp_path / "out/.run-r1"
    assert sorted(p.name for p in work.glob("part-*.parquet")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert not (tmp_path / "out/run-r1").exists()
    inode = (work / "part-00000.parquet").stat().st_ino
    summary = score(cfg)
    assert summary.resumed and summary.units_resumed == 2 and not summary.restarted
    assert (Path(summary.output_path) / "part-00000.parquet").stat().st_ino == inode
    assert read_output(summary).drop_columns(["run_id"]).equals(clean.drop_columns(["run_id"]))
    # Starting a committed run again does nothing and reports the stored summary.
    again = score(cfg)
    assert again.already_complete and again.rows_out == summary.rows_out == 1500


def test_sql_without_order_by_restarts(
    bundles: dict[str, Bundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "in.parquet", make_table(features(1000, seed=9), layout="list"))
    cfg = config(
        bundles["mlp"],
        tmp_path / "in.parquet",
        tmp_path / "out",
        keys=("id",),
        sql="SELECT * FROM input WHERE id >= 0",
        run_id="r2",
    )
    with monkeypatch.context() as m:
        _crash_after(m, 1)
        with pytest.raises(_Crash):
            score(cfg)
    summary = score(cfg)
    assert summary.restarted and summary.units_resumed == 0 and summary.rows_out == 1000
    assert read_output(summary).column("id").to_pylist() == list(range(1000))


def test_resume_refuses_other_inputs(
    bundles: dict[str, Bundle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "in.parquet", make_table(features(1000), layout="list"))
    cfg = config(bundles["mlp"], tmp_path / "in.parquet", tmp_path / "out", run_id="r3")
    with monkeypatch.context() as m:
        _crash_after(m, 1)
        with pytest.raises(_Crash):
            score(cfg)
    with pytest.raises(RunConflictError, match="batch_rows"):
        score(
            config(
                bundles["mlp"],
                tmp_path / "in.parquet",
                tmp_path / "out",
                run_id="r3",
                batch_rows=50,
            )
        )
    assert (
        cli.main(
            [
                "score",
                "--model",
                str(bundles["mlp"].path),
                "--input",
                str(tmp_path / "in.parquet"),
                "--output",
                str(tmp_path / "out"),
                "--run-id",
                "r3",
            ]
        )
        == EXIT_CODES[Status.FAILED_PRECONDITION]
    )


def test_failed_run_resumes_with_skip(bundles: dict[str, Bundle], tmp_path: Path) -> None:
    """Under ``fail`` only clean units are committed, so the run can go on with ``skip``."""
    write(tmp_path / "in/a.parquet", make_table(features(600), layout="scalar"))
    write(tmp_path / "in/b.parquet", _bad_table("null scalar"))
    cfg = config(bundles["mlp"], tmp_path / "in", tmp_path / "out", keys=("id",), run_id="r4")
    with pytest.raises(InvalidRequestError, match=r"b\.parquet row 10: column 'f2' is null"):
        score(cfg)
    assert len(list((tmp_path / "out/.run-r4").glob("part-*.parquet"))) == 2
    summary = score(ScoreConfig(**{**cfg.__dict__, "on_error": "skip"}))
    assert summary.units_resumed == 2 and summary.rows_rejected == 2
    assert summary.rows_out == 998


def _cli_args(bundle: Bundle, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        "score",
        "--model",
        str(bundle.path),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--keys",
        "id",
        "--batch-rows",
        "500",
        "--unit-rows",
        "2000",
        *extra,
    ]


@pytest.mark.parametrize("sql", [None, "SELECT * FROM input ORDER BY id"])
def test_kill_9_then_resume_gives_the_clean_rows(
    bundles: dict[str, Bundle], tmp_path: Path, sql: str | None
) -> None:
    bundle = bundles["slow"]
    rows = 40_000
    write(tmp_path / "in.parquet", make_table(features(rows, seed=10), layout="list"), 2000)
    extra = ("--sql", sql) if sql else ()
    out = tmp_path / "out"
    work, final = out / ".run-k1", out / "run-k1"
    cmd = [
        sys.executable,
        "-m",
        "modelfleet.batch.cli",
        *_cli_args(
            bundle, tmp_path / "in.parquet", out, "--threads", "1", "--run-id", "k1", *extra
        ),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while len(list(work.glob("part-*.parquet"))) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no part files after 30 s"
            # Atomic commit: the final folder never exists while the run is going.
            assert not final.exists()
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not final.exists(), "the run finished before it was killed: make the model slower"
    # Committed = listed in the checkpoint. A part renamed into place just before the kill but
    # not yet listed is not committed: the resume deletes and redoes it.
    lines = (work / "_checkpoint.jsonl").read_text().splitlines()[1:]
    listed = [json.loads(line)["part"] for line in lines if line.endswith("}")]
    committed = {name: (work / name).stat().st_ino for name in listed}
    assert committed and len(committed) < rows // 2000

    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    summary = ScoreSummary(**json.loads(resumed.stdout))
    assert summary.units_resumed == len(committed) and summary.rows_out == rows
    for name, inode in committed.items():  # committed parts were kept, not rewritten
        assert (final / name).stat().st_ino == inode
    assert not work.exists()

    assert (
        cli.main(
            _cli_args(bundle, tmp_path / "in.parquet", tmp_path / "clean", "--run-id", "c1", *extra)
        )
        == 0
    )
    clean = pq.read_table(tmp_path / "clean/run-c1").drop_columns(["run_id"])
    got = pq.read_table(final).drop_columns(["run_id"])
    assert got.equals(clean)
    assert got.column("id").to_pylist() == list(range(rows))


def test_progress_and_summary_on_stderr(
    bundles: dict[str, Bundle],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODELFLEET_PROGRESS", "1")
    write(tmp_path / "in.parquet", make_table(features(500), layout="list"))
    code = cli.main(
        [
            "score",
            "--model",
            str(bundles["mlp"].path),
            "--input",
            str(tmp_path / "in.parquet"),
            "--output",
            str(tmp_path / "out"),
            "--run-id",
            "p1",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "rows/s" in captured.err and "ETA" in captured.err and "500/500 rows" in captured.err
    assert "run p1: 500 rows in, 500 out, 0 rejected" in captured.err
    summary = json.loads(captured.out)
    assert summary["rows_out"] == 500 and summary["output_path"].endswith("run-p1")
