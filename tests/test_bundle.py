"""The bundle format: creation, verification, and a clear error for each kind of damage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from modelfleet.kernel.bundle import create_bundle, load_bundle
from modelfleet.kernel.errors import BundleError, BundleExistsError
from tests import models
from tests.conftest import make_mlp_bundle, mlp_samples


def test_create_computes_expected_outputs_and_signature(repo: Path) -> None:
    b = make_mlp_bundle(repo, 1, latency_budget_ms=50, rtol=1e-3, atol=1e-4)
    assert b.path == repo / "mlp" / "1"
    m = load_bundle(b.path).manifest
    assert (m.name, m.version, m.max_batch_size) == ("mlp", 1, 32)
    assert [(t.name, t.datatype, t.shape) for t in m.inputs] == [("x", "FP32", (-1, 4))]
    assert [(t.name, t.datatype, t.shape) for t in m.outputs] == [("y", "FP32", (-1, 3))]
    assert (m.health.latency_budget_ms, m.health.rtol, m.health.atol) == (50, 1e-3, 1e-4)
    samples = b.health_samples()
    sess = ort.InferenceSession(str(b.model_path))
    np.testing.assert_array_equal(samples.expected["y"], sess.run(None, samples.inputs)[0])
    assert m.provenance["source_file"].endswith(".onnx")


def test_versions_are_immutable(repo: Path) -> None:
    make_mlp_bundle(repo, 1)
    with pytest.raises(BundleExistsError, match="immutable"):
        make_mlp_bundle(repo, 1, seed=3)


def test_no_temporary_directory_left_behind(repo: Path) -> None:
    make_mlp_bundle(repo, 1)
    assert sorted(p.name for p in (repo / "mlp").iterdir()) == ["1"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.onnx").write_bytes(b"garbage"), "model.onnx is 7 bytes"),
        (lambda d: _flip_byte(d / "model.onnx"), "model.onnx sha256"),
        (lambda d: (d / "health.npz").unlink(), "health.npz is missing"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda d: _edit_manifest(d, version="3"), "version must be int"),
        (lambda d: _edit_manifest(d, name="../evil"), "invalid model name"),
        (lambda d: _edit_manifest(d, format=9), "unsupported format 9"),
    ],
)
def test_damaged_bundles_are_refused_with_reason(repo: Path, damage, message: str) -> None:
    b = make_mlp_bundle(repo, 1)
    damage(b.path)
    with pytest.raises(BundleError, match=message):
        load_bundle(b.path)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(d: Path, **changes: object) -> None:
    data = json.loads((d / "manifest.json").read_text())
    data.update(changes)
    (d / "manifest.json").write_text(json.dumps(data))


def test_samples_must_match_the_model(repo: Path, tmp_path: Path) -> None:
    onnx_path = models.mlp(tmp_path / "m.onnx")
    with pytest.raises(BundleError, match="no array for model input 'x'"):
        create_bundle(onnx_path, name="m", version=1, samples={"z": np.zeros((1, 4))}, out_dir=repo)
    with pytest.raises(BundleError, match="'x' has dtype float64, the model expects FP32"):
        create_bundle(onnx_path, name="m", version=1, samples={"x": np.zeros((1, 4))}, out_dir=repo)
    with pytest.raises(BundleError, match=r"'x' has shape \[1, 5\], the model expects \[-1, 4\]"):
        create_bundle(
            onnx_path,
            name="m",
            version=1,
            samples={"x": np.zeros((1, 5), np.float32)},
            out_dir=repo,
        )
    assert not (repo / "m").exists() or not any((repo / "m").iterdir())


def test_not_an_onnx_model(repo: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x00\x01 definitely not protobuf")
    with pytest.raises(BundleError, match="not a valid ONNX model"):
        create_bundle(bogus, name="m", version=1, samples=mlp_samples(), out_dir=repo)


def test_string_samples_round_trip(repo: Path, tmp_path: Path) -> None:
    onnx_path = models.identity(tmp_path / "s.onnx", "BYTES")
    samples = {"x": models.sample_array("BYTES")}
    b = create_bundle(onnx_path, name="strings", version=1, samples=samples, out_dir=repo)
    loaded = load_bundle(b.path).health_samples()
    assert loaded.inputs["x"].dtype == object
    assert list(loaded.expected["y"].ravel()) == list(samples["x"].ravel())


def test_pack_is_deterministic_and_unpack_round_trips(repo: Path, tmp_path: Path) -> None:
    from modelfleet.kernel.bundle import pack_bundle, unpack_bundle

    b = make_mlp_bundle(repo, 4)
    sha1, size1 = pack_bundle(b.path, tmp_path / "a.tar")
    sha2, size2 = pack_bundle(b.path, tmp_path / "b.tar")
    assert (sha1, size1) == (sha2, size2)
    out = unpack_bundle(tmp_path / "a.tar", tmp_path / "cache" / "mlp", expect=("mlp", 4))
    assert out.path == tmp_path / "cache" / "mlp" / "4"
    assert (out.path / "model.onnx").read_bytes() == (b.path / "model.onnx").read_bytes()
    with pytest.raises(BundleError, match="expected 'mlp' version 5"):
        unpack_bundle(tmp_path / "a.tar", tmp_path / "cache2", expect=("mlp", 5))


def test_unpack_refuses_hostile_archives(tmp_path: Path) -> None:
    import io
    import tarfile

    from modelfleet.kernel.bundle import unpack_bundle

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        data = b"owned"
        info = tarfile.TarInfo("../../etc/cron.d/x")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match=r"unexpected archive member '\.\./\.\./etc/cron\.d/x'"):
        unpack_bundle(evil, tmp_path / "out")
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("model.onnx")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(BundleError, match=r"unexpected archive member 'model\.onnx'"):
        unpack_bundle(link, tmp_path / "out")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="not a bundle archive"):
        unpack_bundle(tmp_path / "junk.tar", tmp_path / "out")
    assert not any(p.name.startswith(".unpack-") for p in (tmp_path / "out").iterdir())
