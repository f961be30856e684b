"""Transport-independent parts of the protocol surface (issue 17): class labels in bundles,
the classification extension and the refusal of sequence parameters, in the data plane."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from modelfleet.agent.cli import main as agent_main
from modelfleet.agent.serving.dataplane import check_stateless, class_count, classify
from modelfleet.kernel.bundle import create_bundle, load_bundle, pack_bundle, unpack_bundle
from modelfleet.kernel.errors import EXIT_CODES, BundleError, InvalidRequestError, Status
from tests import models
from tests.conftest import make_mlp_bundle, mlp_samples

LABELS = ("cat", "dog", "fox")


def _version(labels: dict[str, tuple[str, ...]] | None = None, max_batch: int = 8) -> Any:
    manifest = SimpleNamespace(labels=labels or {}, max_batch_size=max_batch, name="m")
    return SimpleNamespace(manifest=manifest, name="m", version=1)


# -- labels in the bundle -----------------------------------------------------------------------


def test_labels_are_kept_in_the_manifest_and_survive_packing(repo: Path, tmp_path: Path) -> None:
    model = models.classifier(tmp_path / "c.onnx", classes=3)
    b = create_bundle(
        model, name="c", version=1, samples=mlp_samples(), out_dir=repo, labels={"probs": LABELS}
    )
    assert load_bundle(b.path).manifest.labels == {"probs": LABELS}
    archive = tmp_path / "c.tar"
    pack_bundle(b.path, archive)
    again = unpack_bundle(archive, tmp_path / "out" / "c")
    assert again.manifest.labels == {"probs": LABELS}


def test_a_bundle_without_labels_keeps_its_manifest_shape(repo: Path) -> None:
    b = make_mlp_bundle(repo, 1)
    assert "labels" not in json.loads((b.path / "manifest.json").read_text())


def test_labels_for_an_unknown_output_are_refused(repo: Path, tmp_path: Path) -> None:
    model = models.classifier(tmp_path / "c.onnx", classes=3)
    with pytest.raises(BundleError, match="no such output"):
        create_bundle(
            model, name="c", version=1, samples=mlp_samples(), out_dir=repo, labels={"y": LABELS}
        )


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"nope": ["a"]}, "labels.nope: the model has no output 'nope'"),
        ({"y": "a,b"}, "labels.y must be a list of strings"),
        (["a"], "labels must be an object"),
    ],
)
def test_damaged_labels_in_a_manifest_are_refused(repo: Path, labels, message: str) -> None:
    b = make_mlp_bundle(repo, 1)
    path = b.path / "manifest.json"
    data = json.loads(path.read_text())
    data["labels"] = labels
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        load_bundle(b.path)


def test_bundle_create_labels_flag(repo: Path, tmp_path: Path, capsys) -> None:
    model = models.classifier(tmp_path / "c.onnx", classes=3)
    samples = tmp_path / "s.npz"
    np.savez(samples, **mlp_samples())
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    base = ["bundle", "create", str(model), "--samples", str(samples), "--out", str(repo)]
    # Two outputs: the flag must say which one.
    code = agent_main([*base, "--name", "c", "--version", "1", "--labels", str(labels)])
    assert code == EXIT_CODES[Status.INVALID_ARGUMENT]
    assert "has 2 outputs (logits, probs); say which one" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = agent_main([*base, "--name", "c", "--version", "1", "--labels", f"probs={empty}"])
    assert code == EXIT_CODES[Status.INVALID_ARGUMENT]
    assert "is empty" in capsys.readouterr().err
    code = agent_main([*base, "--name", "c", "--version", "1", "--labels", f"probs={labels}"])
    assert code == 0, capsys.readouterr().err
    assert load_bundle(repo / "c" / "1").manifest.labels == {"probs": LABELS}


# -- classification -----------------------------------------------------------------------------


def test_classify_ranks_each_row_and_names_labels() -> None:
    arr = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    out = classify(_version({"p": LABELS}), "p", arr, 2)
    assert (out.datatype, out.shape) == ("BYTES", (2, 2))
    assert [e.decode() for e in out.data.ravel()] == [
        "0.700000:1:dog",
        "0.200000:2:fox",
        "0.500000:0:cat",
        # A tie: the lower index first.
        "0.250000:1:dog",
    ]


def test_classify_integers_and_unbatched_and_short_label_lists() -> None:
    arr = np.array([3, 9, 1, 9], np.int64)
    out = classify(_version({"p": ("a",)}, max_batch=0), "p", arr, 10)
    assert out.shape == (4,)
    assert [e.decode() for e in out.data] == ["9:1", "9:3", "3:0:a", "1:2"]


def test_classify_refuses_strings() -> None:
    arr = np.array([b"a", b"b"], dtype=object)
    with pytest.raises(InvalidRequestError, match="BYTES: classification needs a numeric output"):
        classify(_version(max_batch=0), "p", arr, 1)


@pytest.mark.parametrize("bad", [0, -3, True, "2", 1.5])
def test_class_count_must_be_a_positive_integer(bad) -> None:
    with pytest.raises(InvalidRequestError, match="must be a positive integer"):
        class_count("p", {"classification": bad})


def test_class_count_absent_is_zero() -> None:
    assert class_count("p", {"binary_data": True}) == 0
    assert class_count("p", {"classification": 4}) == 4


# -- sequences ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"sequence_id": 5},
        {"sequence_id": "s-1", "sequence_start": True},
        {"sequence_start": False},
        {"sequence_end": True},
    ],
)
def test_sequence_parameters_are_refused(params) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_stateless(_version(), params)
    first = next(iter(params))
    assert f"{first!r}" in str(info.value) and "stateless" in str(info.value)
    assert info.value.reason == "sequence"


def test_other_parameters_pass() -> None:
    check_stateless(_version(), {"routing_key": "u1", "priority": 1})
