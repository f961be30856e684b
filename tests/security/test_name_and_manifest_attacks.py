"""Red-team pass: names that reach the disk, and provider options a signed bundle may carry.

Names: every name check uses ``^...$``-style patterns, and Python's ``$`` also matches before a
final newline, so ``"m\\n"`` passed as a model, agent, file id, blob hash or identity, and became
a directory or certificate subject with a newline in it. An agent chose such names over MQTT
(capture uploads). The checks now end at the string's end (``\\Z``).

Provider options: a bundle's manifest names onnxruntime provider options, which the agent hands
to onnxruntime as they are. Some of them are file paths, library paths or raw addresses
(TensorRT's trt_extra_plugin_lib_paths, CUDA's gpu_external_alloc): through them whoever can
get a bundle signed would choose what code an agent loads or which address it calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelfleet.hub.blobs import BlobStore
from modelfleet.hub.capture import CaptureStore, UploadHeader
from modelfleet.hub.outcomes import check_model
from modelfleet.kernel.bundle import parse_manifest, providers_from_args
from modelfleet.kernel.errors import BundleError, InvalidRequestError, ModelfleetError
from modelfleet.kernel.identity import agent_common_name
from tests.conftest import make_mlp_bundle

SHA = "a" * 64


@pytest.mark.parametrize(
    ("model", "file_id", "agent"),
    [("m\n", "f1", "a1"), ("m", "f1\n", "a1"), ("m", "f1", "a1\n")],
    ids=["model", "file id", "agent id"],
)
def test_capture_chunk_with_a_newline_in_a_name_writes_nothing(
    tmp_path: Path, model: str, file_id: str, agent: str
) -> None:
    store = CaptureStore(tmp_path / "capture")
    with pytest.raises(InvalidRequestError, match="not a valid name"):
        store.append(agent, UploadHeader(model, file_id, 3, SHA, 0), b"abc")
    assert not any((tmp_path / "capture").rglob("*")), list((tmp_path / "capture").rglob("*"))


def test_capture_sha256_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="sha256"):
        UploadHeader("m", "f1", 3, SHA + "\n", 0).check()


def test_other_names_with_a_trailing_newline_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelfleetError):
        agent_common_name("edge-1\n")
    with pytest.raises(InvalidRequestError):
        check_model("mlp\n")
    with pytest.raises(ModelfleetError):
        BlobStore(tmp_path / "blobs").path(SHA + "\n")
    b = make_mlp_bundle(tmp_path / "repo", 1)
    raw = json.loads((b.path / "manifest.json").read_text())
    raw["name"] = "mlp\n"
    with pytest.raises(BundleError):
        parse_manifest(raw)


UNSAFE = [
    ("TensorrtExecutionProvider", "trt_extra_plugin_lib_paths", "/tmp/evil.so"),
    ("TensorrtExecutionProvider", "trt_engine_decryption_lib_path", "/tmp/evil.so"),
    ("TensorrtExecutionProvider", "trt_engine_cache_path", "/etc/modelfleet"),
    ("TensorrtExecutionProvider", "trt_timing_cache_path", "/etc/modelfleet"),
    # A file name prefix inside the cache folder: "../" in it would leave the folder.
    ("TensorrtExecutionProvider", "trt_engine_cache_prefix", "../../../etc/cron.d/x"),
    ("TensorrtExecutionProvider", "trt_ep_context_file_path", "/tmp/ctx.onnx"),
    ("TensorrtExecutionProvider", "trt_onnx_model_folder_path", "/tmp"),
    ("TensorrtExecutionProvider", "trt_dump_subgraphs", "True"),
    ("TensorrtExecutionProvider", "trt_int8_calibration_table_name", "../../x"),
    ("CUDAExecutionProvider", "gpu_external_alloc", "140737488355328"),
    ("CUDAExecutionProvider", "user_compute_stream", "1"),
    ("OpenVINOExecutionProvider", "cache_dir", "/var/lib/modelfleet"),
    ("OpenVINOExecutionProvider", "load_config", "/tmp/x.json"),
]


@pytest.mark.parametrize(("provider", "key", "value"), UNSAFE, ids=[u[1] for u in UNSAFE])
def test_a_signed_manifest_cannot_set_path_library_or_address_options(
    tmp_path: Path, provider: str, key: str, value: str
) -> None:
    # What an agent does with a fetched bundle's manifest: parse it (a BundleError makes the
    # version refused, and the agent serves on with the one it had).
    b = make_mlp_bundle(tmp_path / "repo", 1)
    raw = json.loads((b.path / "manifest.json").read_text())
    raw["execution"]["providers"] = [{"name": provider, "options": {key: value}}]
    with pytest.raises(BundleError, match=key) as err:
        parse_manifest(raw)
    assert "Leave it out of the bundle" in str(err.value)
    # And `bundle create --provider-option` refuses it where the bundle is made.
    short = provider.removesuffix("ExecutionProvider").lower()
    with pytest.raises(BundleError, match=key):
        providers_from_args(short, [f"{short}:{key}={value}"])


def test_tuning_options_stay_allowed() -> None:
    specs = providers_from_args(
        "tensorrt,cuda,cpu",
        [
            "tensorrt:trt_fp16_enable=True",
            "tensorrt:trt_max_workspace_size=1073741824",
            "tensorrt:trt_engine_cache_enable=True",
            "cuda:cudnn_conv_algo_search=HEURISTIC",
            "cuda:do_copy_in_default_stream=1",
            "cuda:gpu_mem_limit=2147483648",
        ],
    )
    assert [len(s.options) for s in specs] == [3, 3, 0]


def test_an_agent_cannot_fill_the_hub_disk_with_abandoned_partial_uploads(tmp_path: Path) -> None:
    # Each first chunk of a new file id opened a partial file that nothing ever removed: an
    # agent (or a replay of its chunks under new ids) could leave any number of them, each up to
    # MAX_FILE_BYTES. Uploads in progress are now bounded per agent; stale ones expire.
    import os
    import time

    from modelfleet.hub import capture as cap
    from modelfleet.kernel.errors import ResourceExhaustedError

    store = CaptureStore(tmp_path / "capture")
    for i in range(cap.MAX_PARTIALS_PER_AGENT):
        have, stored, taken = store.append("a1", UploadHeader("m", f"f{i}", 10, SHA, 0), b"x")
        assert (have, stored, taken) == (1, False, True)
    with pytest.raises(ResourceExhaustedError, match="uploads in progress") as err:
        store.append("a1", UploadHeader("m", "one-more", 10, SHA, 0), b"x")
    assert "a1" in str(err.value)
    # A chunk continuing an upload in progress still goes on, and other agents are not held up.
    assert store.append("a1", UploadHeader("m", "f0", 10, SHA, 1), b"y")[0] == 2
    assert store.append("a2", UploadHeader("m", "f0", 10, SHA, 0), b"x")[2]
    # An upload untouched for longer than PARTIAL_TTL_S is dropped to make room.
    old = time.time() - cap.PARTIAL_TTL_S - 60
    stale = tmp_path / "capture" / ".partial" / "a1" / "m" / "f1.part"
    os.utime(stale, (old, old))
    assert store.append("a1", UploadHeader("m", "one-more", 10, SHA, 0), b"x")[2]
    assert not stale.exists()
