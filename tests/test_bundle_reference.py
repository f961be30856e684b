"""Reference statistics in the bundle: created, signed by hash, verified, refused when wrong.

Attacks and faults first: an altered, missing or unlisted reference.json; statistics that cannot
be trusted (edges out of order, NaN); then the happy paths, old bundles, and the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelfleet.kernel.bundle import (
    REFERENCE_FILE,
    create_bundle,
    load_bundle,
    pack_bundle,
    unpack_bundle,
)
from modelfleet.kernel.drift import DriftWindow
from modelfleet.kernel.errors import BundleError
from tests import models
from tests.conftest import make_mlp_bundle, mlp_samples
from tests.procs import ROOT

WIDTH = 4


def reference_parquet(path: Path, rows: int = 1000, *, names: list[str] | None = None) -> Path:
    rng = np.random.default_rng(2)
    names = names or [f"x[{i}]" for i in range(WIDTH)]
    columns = {n: rng.standard_normal(rows).astype(np.float32) for n in names[:-1]}
    columns[names[-1]] = rng.integers(0, 4, rows).astype(np.int64)  # a coded feature
    pq.write_table(pa.table(columns), path)
    return path


def with_reference(tmp_path: Path, version: int = 1, **kwargs: object):
    ref = reference_parquet(tmp_path / f"ref-{version}.parquet")
    return make_mlp_bundle(tmp_path / "repo", version, reference=ref, **kwargs)


def test_an_altered_reference_fails_verification_naming_the_file(tmp_path: Path) -> None:
    bundle = with_reference(tmp_path)
    path = bundle.path / REFERENCE_FILE
    data = json.loads(path.read_bytes())
    data["tensors"][0]["features"][0]["counts"].reverse()  # same size, other statistics
    text = json.dumps(data, indent=1) + "\n"
    assert len(text) == path.stat().st_size
    path.write_text(text)
    with pytest.raises(BundleError, match=r"reference\.json sha256 .* does not match"):
        load_bundle(bundle.path)
    with pytest.raises(BundleError, match=r"reference\.json sha256"):
        bundle.reference()  # read again at use, not only at load
    path.write_text(text + " ")
    with pytest.raises(BundleError, match=r"reference\.json is \d+ bytes, manifest says"):
        load_bundle(bundle.path)
    path.unlink()
    with pytest.raises(BundleError, match=r"reference\.json is missing"):
        load_bundle(bundle.path)


def test_an_unlisted_reference_is_refused_not_ignored(tmp_path: Path) -> None:
    bundle = make_mlp_bundle(tmp_path / "repo", 1)
    (bundle.path / REFERENCE_FILE).write_text("{}")
    with pytest.raises(BundleError, match=r"reference\.json is there but the manifest"):
        load_bundle(bundle.path)


def test_an_archive_with_an_altered_reference_is_refused_on_unpack(tmp_path: Path) -> None:
    bundle = with_reference(tmp_path)
    archive = tmp_path / "b.tar"
    pack_bundle(bundle.path, archive)
    blob = bytearray(archive.read_bytes())
    at = blob.index(b'"counts"', blob.index(b'"tensors"'))
    digit = blob.index(b"1", at)
    blob[digit : digit + 1] = b"2"  # one count, same length: only the hash can tell
    archive.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match=r"reference\.json sha256"):
        unpack_bundle(archive, tmp_path / "unpacked", expect=("mlp", 1))
    assert not (tmp_path / "unpacked" / "1").exists()


@pytest.mark.parametrize(
    ("edges", "message"),
    [
        ([0.0, 2.0, 1.0], r"edges must be strictly increasing, but edge 2 \(1\.0\) follows 2\.0"),
        ([0.0, 1.0, 1.0], r"strictly increasing"),
        ([0.0, float("nan"), 1.0], r"edge 1 is nan; edges must be finite numbers"),
    ],
)
def test_untrustworthy_statistics_are_refused_at_create(
    tmp_path: Path, edges: list[float], message: str
) -> None:
    bundle = with_reference(tmp_path)
    data = json.loads((bundle.path / REFERENCE_FILE).read_text())
    feature = data["tensors"][0]["features"][0]
    feature["edges"] = edges
    feature["counts"] = [data["rows"]] + [0] * (len(edges) + 1)
    bad = tmp_path / "bad-reference.json"
    bad.write_text(json.dumps(data))  # json writes NaN as a bare NaN, which Python reads back
    with pytest.raises(BundleError, match=message) as info:
        make_mlp_bundle(tmp_path / "repo", 2, reference=bad)
    assert str(bad) in str(info.value) and "x[0]" in str(info.value)
    assert not (tmp_path / "repo" / "mlp" / "2").exists()


def test_reference_data_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    few = reference_parquet(tmp_path / "few.parquet", rows=100)
    with pytest.raises(BundleError, match=r"has 100 rows; at least 500 are needed"):
        make_mlp_bundle(tmp_path / "repo", 1, reference=few)
    other = reference_parquet(tmp_path / "other.parquet", names=["a", "b", "c", "d"])
    with pytest.raises(BundleError, match=r"no column for input 'x'.*'x\[0\]' \.\.\. 'x\[3\]'"):
        make_mlp_bundle(tmp_path / "repo", 1, reference=other)
    # A reference.json built for another model (3 values per row for x, not 4).
    small = models.mlp(tmp_path / "small.onnx", inputs=3)
    rows = np.random.default_rng(0).standard_normal((600, 3)).astype(np.float32)
    pq.write_table(pa.table({"x": list(rows)}), tmp_path / "three.parquet")
    made = create_bundle(
        small,
        name="small",
        version=1,
        samples={"x": rows[:2]},
        out_dir=tmp_path / "repo",
        reference=tmp_path / "three.parquet",  # one list column named like the input
    )
    wrong = made.path / REFERENCE_FILE
    with pytest.raises(BundleError, match=r"3 values per row for input 'x', the model has 4"):
        make_mlp_bundle(tmp_path / "repo", 1, reference=wrong)
    assert not (tmp_path / "repo" / "mlp").exists()


def test_feature_names_name_the_features_and_outputs_get_a_reference_too(tmp_path: Path) -> None:
    names = ["amount", "age", "risk", "channel"]
    ref = reference_parquet(tmp_path / "named.parquet", names=names)
    bundle = make_mlp_bundle(tmp_path / "repo", 1, reference=ref, feature_names=tuple(names))
    reference = load_bundle(bundle.path).reference()
    assert reference is not None and reference.rows == 1000 and reference.source == "named.parquet"
    x, y = reference.tensors
    assert (x.tensor, x.role, y.tensor, y.role) == ("x", "input", "y", "output")
    assert [f.name for f in x.features] == names
    assert x.features[3].kind == "categorical" and sorted(x.features[3].categories) == [0, 1, 2, 3]
    assert [f.name for f in y.features] == ["y[0]", "y[1]", "y[2]"]
    assert all(sum(f.counts) == 1000 for f in (*x.features, *y.features))
    # The agent's accumulator takes the bundle's reference as it is.
    window = DriftWindow(reference)
    window.add({"x": mlp_samples(16)["x"]})
    assert window.snapshot().rows["x"] == 16


def test_a_reference_survives_packing_and_unpacking_and_is_signed_with_the_bundle(
    tmp_path: Path,
) -> None:
    bundle = with_reference(tmp_path)
    archive = tmp_path / "b.tar"
    sha, _ = pack_bundle(bundle.path, archive)
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["manifest.json", "model.onnx", "health.npz", REFERENCE_FILE]
    assert pack_bundle(bundle.path, tmp_path / "again.tar")[0] == sha  # deterministic
    unpacked = unpack_bundle(archive, tmp_path / "unpacked", expect=("mlp", 1))
    assert unpacked.reference() == bundle.reference()


def test_bundles_without_a_reference_are_unchanged(tmp_path: Path) -> None:
    bundle = make_mlp_bundle(tmp_path / "repo", 1)
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    assert "reference" not in manifest  # older readers and hashes see the same manifest
    loaded = load_bundle(bundle.path)
    assert loaded.reference() is None and loaded.manifest.reference is None
    archive = tmp_path / "b.tar"
    pack_bundle(bundle.path, archive)
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["manifest.json", "model.onnx", "health.npz"]
    assert unpack_bundle(archive, tmp_path / "u", expect=("mlp", 1)).reference() is None


def run_agent_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modelfleet.agent.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bundle_create_and_inspect_with_a_reference_through_the_cli(tmp_path: Path) -> None:
    onnx_path = models.mlp(tmp_path / "fraud.onnx")
    np.savez(tmp_path / "samples.npz", **mlp_samples())
    ref = reference_parquet(tmp_path / "ref.parquet")
    repo = tmp_path / "repo"
    r = run_agent_cli(
        "bundle",
        "create",
        str(onnx_path),
        "--name",
        "fraud",
        "--version",
        "1",
        "--samples",
        str(tmp_path / "samples.npz"),
        "--out",
        str(repo),
        "--reference",
        str(ref),
        "--reference-bins",
        "5",
    )
    assert r.returncode == 0, r.stderr
    assert "reference: 1000 rows, 7 features in reference.json" in r.stdout
    r = run_agent_cli("bundle", "inspect", str(repo / "fraud" / "1"))
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)["reference"]
    assert listed["path"] == REFERENCE_FILE and len(listed["sha256"]) == 64
    r = run_agent_cli("bundle", "inspect", "--reference", str(repo / "fraud" / "1"))
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["rows"] == 1000 and shown["bins"] == 5
    assert len(shown["tensors"][0]["features"][0]["edges"]) == 4
    # A bundle without statistics says so, with the flag that makes them.
    np.savez(tmp_path / "samples.npz", **mlp_samples())
    r = run_agent_cli(
        "bundle",
        "create",
        str(onnx_path),
        "--name",
        "fraud",
        "--version",
        "2",
        "--samples",
        str(tmp_path / "samples.npz"),
        "--out",
        str(repo),
    )
    assert r.returncode == 0, r.stderr
    r = run_agent_cli("bundle", "inspect", "--reference", str(repo / "fraud" / "2"))
    assert r.returncode == 3
    assert "has no reference statistics" in r.stderr and "--reference" in r.stderr
    # Bad statistics: one line, exit 3, naming the file.
    bad = tmp_path / "bad.json"
    data = shown
    data["tensors"][0]["features"][0]["edges"].reverse()
    bad.write_text(json.dumps(data))
    r = run_agent_cli(
        "bundle",
        "create",
        str(onnx_path),
        "--name",
        "fraud",
        "--version",
        "3",
        "--samples",
        str(tmp_path / "samples.npz"),
        "--out",
        str(repo),
        "--reference",
        str(bad),
    )
    assert r.returncode == 3 and "strictly increasing" in r.stderr and str(bad) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_hub_verifies_the_reference_of_an_upload(tmp_path: Path) -> None:
    from tests.test_backup import close, make_core

    bundle = with_reference(tmp_path)
    good = tmp_path / "good.tar"
    pack_bundle(bundle.path, good)
    blob = bytearray(good.read_bytes())
    at = blob.index(b'"counts"', blob.index(b'"tensors"'))
    digit = blob.index(b"1", at)
    blob[digit : digit + 1] = b"2"
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(blob))
    core = make_core(tmp_path / "hub")
    try:
        header = {"name": "mlp", "version": 1}
        with pytest.raises(BundleError, match=r"reference\.json sha256"):
            core.verify_upload(header, bad)
        verified = core.verify_upload(header, good)
        assert verified["manifest"]["reference"]["sha256"] == bundle.manifest.reference.sha256
    finally:
        close(core)


def test_missing_values_in_the_reference_are_counted_and_an_empty_feature_is_refused(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(6)
    cols = {f"x[{i}]": rng.standard_normal(600).astype(np.float32) for i in range(WIDTH)}
    cols["x[1]"][:60] = np.nan
    pq.write_table(pa.table(cols), tmp_path / "gaps.parquet")
    bundle = make_mlp_bundle(tmp_path / "repo", 1, reference=tmp_path / "gaps.parquet")
    reference = bundle.reference()
    assert reference is not None
    x1 = reference.tensors[0].features[1]
    assert x1.counts[-1] == 60 and sum(x1.counts) == 600  # the missing slot
    cols["x[2]"][:] = np.nan
    pq.write_table(pa.table(cols), tmp_path / "empty.parquet")
    with pytest.raises(BundleError, match=r"feature 'x\[2\]' of tensor 'x' has no finite value"):
        make_mlp_bundle(tmp_path / "repo", 2, reference=tmp_path / "empty.parquet")


def test_both_command_lines_default_to_the_kernels_bins_and_top_k() -> None:
    from modelfleet.agent.cli import build_parser as agent_parser
    from modelfleet.hub.cli import build_parser as hub_parser
    from modelfleet.kernel.drift import DEFAULT_BINS, DEFAULT_TOP_K

    # The hub's CLI spells the numbers out so that parsing its arguments does not import numpy.
    hub = hub_parser().parse_args(["publish", "m", "m.onnx"])
    create = ["bundle", "create", "m.onnx", "--name", "m", "--version", "1"]
    agent = agent_parser().parse_args([*create, "--samples", "s.npz", "--out", "o"])
    for args in (hub, agent):
        assert (args.reference_bins, args.reference_top_k) == (DEFAULT_BINS, DEFAULT_TOP_K)
        assert args.reference is None
