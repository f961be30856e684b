"""Execution providers (docs/gpu.md): the bundle's preferences, the agent's pins, CPU fallback.

This machine has no GPU, so the process tests drive the fallback a CPU node takes for a bundle
that asks for CUDA; the choice of providers itself is a pure function, tested here with the
provider lists a GPU node's onnxruntime reports. tests/benchmarks/gpu_bench.py runs the CUDA
path for real on a GPU node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from modelfleet.agent.config import load_config, model_device_ids
from modelfleet.kernel.bundle import (
    ProviderSpec,
    load_bundle,
    parse_manifest,
    provider_specs,
    providers_from_args,
)
from modelfleet.kernel.errors import BundleError, InvalidRequestError
from modelfleet.kernel.runtime import (
    OnnxModel,
    ProviderUnavailableError,
    RuntimeOptions,
    plan_providers,
)
from tests import models
from tests.conftest import make_mlp_bundle, mlp_samples
from tests.procs import ROOT, agent_status, wait_for

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
GPU_NODE = [TRT, CUDA, CPU]
CPU_NODE = [CPU]
X = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)

pytestmark = pytest.mark.skipif(
    CUDA in ort.get_available_providers(),
    reason="these tests pin the CPU fallback; on a CUDA node run tests/benchmarks/gpu_bench.py",
)


def specs(*names: str) -> tuple[ProviderSpec, ...]:
    return tuple(ProviderSpec(n) for n in names)


# -- the choice of providers ----------------------------------------------------------------------


def test_a_gpu_node_serves_the_bundles_order_with_the_pinned_device() -> None:
    opts = RuntimeOptions(device_id=1, model_device_ids=(("big", 3),))
    plan = plan_providers(
        (
            ProviderSpec(TRT),
            ProviderSpec(CUDA, (("device_id", "0"), ("x", "y"))),
            ProviderSpec(CPU),
        ),
        opts,
        "mlp",
        GPU_NODE,
    )
    # The operator's device id wins over the bundle's: the operator knows the node's GPUs.
    # No cache folder was given, so TensorRT's caches are off (not in the working directory).
    off = {"trt_engine_cache_enable": "False", "trt_timing_cache_enable": "False"}
    assert plan.chain == (
        (TRT, {"device_id": "1", **off}),
        (CUDA, {"device_id": "1", "x": "y"}),
        (CPU, {}),
    )
    assert (plan.wanted, plan.requested, plan.missing) == (TRT, True, None)
    big = plan_providers(specs(CUDA), opts, "big", GPU_NODE)
    assert big.chain == ((CUDA, {"device_id": "3"}), (CPU, {}))


def test_a_cpu_node_falls_back_and_says_what_to_install() -> None:
    plan = plan_providers(specs(CUDA, CPU), RuntimeOptions(), "mlp", CPU_NODE)
    assert plan.chain == ((CPU, {}),)
    assert plan.requested and plan.wanted == CUDA
    assert plan.missing is not None and plan.missing[0] == CUDA
    assert "onnxruntime-gpu" in plan.missing[1] and "CPUExecutionProvider" in plan.missing[1]


def test_the_default_preference_is_cuda_but_its_absence_is_no_fallback() -> None:
    on_gpu = plan_providers((), RuntimeOptions(), "mlp", GPU_NODE)
    assert [n for n, _ in on_gpu.chain] == [CUDA, CPU]  # TensorRT only when a bundle asks
    on_cpu = plan_providers((), RuntimeOptions(), "mlp", CPU_NODE)
    assert [n for n, _ in on_cpu.chain] == [CPU]
    assert not on_cpu.requested  # a plain CPU node does not count a fallback per model


def test_device_cpu_and_allowed_providers_pin_the_node() -> None:
    cpu = plan_providers(specs(TRT, CUDA), RuntimeOptions(device="cpu"), "m", GPU_NODE)
    assert cpu.chain == ((CPU, {}),) and not cpu.requested
    no_trt = plan_providers(
        specs(TRT, CUDA, CPU), RuntimeOptions(allowed_providers=(CUDA,)), "m", GPU_NODE
    )
    assert [n for n, _ in no_trt.chain] == [CUDA, CPU] and no_trt.wanted == CUDA
    # device = "cuda" wants a GPU provider even for a bundle that names none.
    cuda = plan_providers(specs(CPU), RuntimeOptions(device="cuda"), "m", GPU_NODE)
    assert [n for n, _ in cuda.chain] == [CUDA, CPU] and cuda.wanted == CUDA
    cpu_first = plan_providers(specs(CPU, CUDA), RuntimeOptions(device="cuda"), "m", GPU_NODE)
    assert [n for n, _ in cpu_first.chain] == [CUDA, CPU] and cpu_first.wanted == CUDA


# -- where TensorRT writes ------------------------------------------------------------------------


def test_a_version_rebuilt_with_other_weights_gets_another_tensorrt_folder(tmp_path: Path) -> None:
    """onnxruntime names a cached engine by the model file and its tensors, not its weights:
    the folder carries the model's digest, so retrained bytes never load the old engine."""
    opts = RuntimeOptions(cache_dir=str(tmp_path))
    bundle = (ProviderSpec(TRT, (("trt_engine_cache_enable", "True"),)),)
    first = plan_providers(bundle, opts, "resnet", GPU_NODE, 4, "ab" * 32)
    again = plan_providers(bundle, opts, "resnet", GPU_NODE, 4, "cd" * 32)
    folder = first.chain[0][1]["trt_engine_cache_path"]
    assert folder == str(tmp_path / TRT / "resnet" / ("4-" + "ab" * 8))
    assert again.chain[0][1]["trt_engine_cache_path"] != folder


def test_tensorrt_caches_go_to_the_agents_folder_for_the_model_and_version(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "state" / "provider-cache"
    bundle = (
        ProviderSpec(TRT, (("trt_engine_cache_enable", "True"), ("trt_fp16_enable", "True"))),
        ProviderSpec(CUDA),
    )
    plan = plan_providers(bundle, RuntimeOptions(cache_dir=str(cache)), "resnet", GPU_NODE, 4)
    folder = str(cache / TRT / "resnet" / "4")
    assert plan.chain[0] == (
        TRT,
        {
            "trt_engine_cache_enable": "True",
            "trt_fp16_enable": "True",
            "device_id": "0",
            "trt_engine_cache_path": folder,
            "trt_timing_cache_path": folder,
        },
    )
    # Other providers get no cache keys; versions never share a folder (an engine is built
    # for one model's bytes).
    assert plan.chain[1] == (CUDA, {"device_id": "0"})
    other = plan_providers(bundle, RuntimeOptions(cache_dir=str(cache)), "resnet", GPU_NODE, 5)
    assert other.chain[0][1]["trt_engine_cache_path"] == str(cache / TRT / "resnet" / "5")


def test_a_cache_path_that_reaches_the_plan_anyway_is_replaced(tmp_path: Path) -> None:
    """Manifests naming paths are refused at parse time (tests/security); should a spec carry
    one by another way, the agent's folder still wins, or caches are off."""
    planted = (
        ProviderSpec(
            TRT,
            (
                ("trt_engine_cache_enable", "True"),
                ("trt_engine_cache_path", "/etc/cron.d"),
                ("trt_timing_cache_path", "/tmp/evil"),
            ),
        ),
    )
    mine = plan_providers(planted, RuntimeOptions(cache_dir=str(tmp_path)), "m", GPU_NODE, 1)
    opts = mine.chain[0][1]
    assert (
        opts["trt_engine_cache_path"]
        == opts["trt_timing_cache_path"]
        == str(tmp_path / TRT / "m" / "1")
    )
    nowhere = plan_providers(planted, RuntimeOptions(), "m", GPU_NODE, 1).chain[0][1]
    assert "trt_engine_cache_path" not in nowhere and "trt_timing_cache_path" not in nowhere
    assert nowhere["trt_engine_cache_enable"] == nowhere["trt_timing_cache_enable"] == "False"


def _record_sessions(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, dict]]]:
    """onnxruntime here is the CPU build: pretend it lists TensorRT (as onnxruntime-gpu does),
    and record the providers each session is created with. onnxruntime itself skips a
    provider it does not have and serves on CPU: the fallback a node without TensorRT's
    libraries takes."""
    seen: list[list[tuple[str, dict]]] = []
    real = OnnxModel._session
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CPU])

    def session(self, so, chain):
        seen.append([(n, dict(o)) for n, o in chain])
        return real(self, so, chain)

    monkeypatch.setattr(OnnxModel, "_session", session)
    return seen


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_a_tensorrt_session_gets_a_private_cache_folder_and_serves_on_cpu_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _record_sessions(monkeypatch)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    state = tmp_path / "state"
    b = make_mlp_bundle(
        tmp_path / "repo", 3, providers=(ProviderSpec(TRT, (("trt_engine_cache_enable", "1"),)),)
    )
    model = OnnxModel(load_bundle(b.path), RuntimeOptions(cache_dir=str(state / "cache")))
    folder = state / "cache" / TRT / "mlp" / f"3-{b.manifest.model_sha256[:16]}"
    assert seen[0][0] == (
        TRT,
        {
            "trt_engine_cache_enable": "1",
            "device_id": "0",
            "trt_engine_cache_path": str(folder),
            "trt_timing_cache_path": str(folder),
        },
    )
    for d in (state / "cache", state / "cache" / TRT, state / "cache" / TRT / "mlp", folder):
        assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700, d
    # The CPU fallback serves, and nothing was written into the working directory.
    assert model.provider == CPU and model.fallback is not None and model.fallback[0] == TRT
    assert model.run({"x": X})["y"].shape == (2, 3)
    assert list(work.iterdir()) == []


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_an_unsafe_cache_folder_turns_the_caches_off_and_the_version_still_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone put a symlink where the model's cache folder goes (to make TensorRT load an
    engine they wrote, or write one where they choose): it is not followed."""
    seen = _record_sessions(monkeypatch)
    cache = tmp_path / "cache"
    (cache / TRT).mkdir(parents=True, mode=0o755)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache / TRT / "mlp").symlink_to(elsewhere)
    b = make_mlp_bundle(
        tmp_path / "repo", 1, providers=(ProviderSpec(TRT, (("trt_engine_cache_enable", "1"),)),)
    )
    model = OnnxModel(load_bundle(b.path), RuntimeOptions(cache_dir=str(cache)))
    trt = seen[0][0][1]
    assert "trt_engine_cache_path" not in trt and trt["trt_engine_cache_enable"] == "False"
    assert "TensorRT caches are off" in caplog.text and "symlink" in caplog.text
    assert list(elsewhere.iterdir()) == []
    # The folder above it existed with 0755: tightened on the way down.
    assert (cache / TRT).stat().st_mode & 0o777 == 0o700
    assert model.run({"x": X})["y"].shape == (2, 3)


def test_a_data_folder_others_can_write_turns_the_caches_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever can write the folder above the cache could swap the cache folder for their own
    after the checks: with a group-writable data folder the caches stay off."""
    seen = _record_sessions(monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o775)
    b = make_mlp_bundle(
        tmp_path / "repo", 1, providers=(ProviderSpec(TRT, (("trt_engine_cache_enable", "1"),)),)
    )
    OnnxModel(load_bundle(b.path), RuntimeOptions(cache_dir=str(data / "provider-cache")))
    trt = seen[0][0][1]
    assert "trt_engine_cache_path" not in trt and trt["trt_engine_cache_enable"] == "False"
    assert "not this agent's alone" in caplog.text
    assert not (data / "provider-cache").exists()


def test_without_tensorrt_in_the_chain_no_cache_folder_is_made(tmp_path: Path) -> None:
    b = make_mlp_bundle(tmp_path / "repo", 1, providers=specs(TRT, CUDA, CPU))
    OnnxModel(load_bundle(b.path), RuntimeOptions(cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists()


def test_the_agent_puts_provider_caches_in_its_data_folder(tmp_path: Path) -> None:
    cfg = load_config(overrides={"data": str(tmp_path / "data")})
    assert cfg.provider_cache_path() == tmp_path / "data" / "provider-cache"


# -- the manifest and `bundle create` ----------------------------------------------------------


def test_providers_are_signed_in_the_manifest_and_absent_when_unset(tmp_path: Path) -> None:
    wanted = providers_from_args("tensorrt,CUDA,cpu", ["cuda:cudnn_conv_algo_search=DEFAULT"])
    b = make_mlp_bundle(tmp_path / "repo", 1, providers=wanted)
    loaded = load_bundle(b.path)
    assert [p.name for p in loaded.manifest.providers] == [TRT, CUDA, CPU]
    assert dict(loaded.manifest.providers[1].options) == {"cudnn_conv_algo_search": "DEFAULT"}
    plain = make_mlp_bundle(tmp_path / "repo", 2)
    raw = json.loads((plain.path / "manifest.json").read_text())
    # A bundle without preferences keeps the manifest (and so the hash) it always had.
    assert "providers" not in raw["execution"]


@pytest.mark.parametrize(
    ("providers", "needle"),
    [
        ("nope", "not an execution provider name"),
        ([{"name": CUDA, "options": {"device_id": 0}}], "must map strings to strings"),
        ([{"name": CUDA}, {"name": CUDA}], "lists a provider twice"),
        ({"name": CUDA}, "must be a list"),
    ],
)
def test_a_malformed_providers_list_is_refused(tmp_path: Path, providers, needle: str) -> None:
    b = make_mlp_bundle(tmp_path / "repo", 1)
    raw = json.loads((b.path / "manifest.json").read_text())
    if isinstance(providers, str):
        providers = [{"name": providers}]
    raw["execution"]["providers"] = providers
    with pytest.raises(BundleError, match=needle):
        parse_manifest(raw)


def test_a_provider_newer_than_this_onnxruntime_parses_and_counts_as_unavailable(
    tmp_path: Path,
) -> None:
    b = make_mlp_bundle(tmp_path / "repo", 1)
    raw = json.loads((b.path / "manifest.json").read_text())
    raw["execution"]["providers"] = [{"name": "FutureExecutionProvider", "options": {}}]
    m = parse_manifest(raw)
    plan = plan_providers(m.providers, RuntimeOptions(), "mlp", GPU_NODE)
    assert plan.chain == ((CPU, {}),) and plan.missing is not None


def test_bogus_names_and_options_are_refused_naming_the_valid_ones() -> None:
    with pytest.raises(BundleError) as err:
        provider_specs(["cuda", "GpuExecutionProvider"])
    assert "GpuExecutionProvider" in str(err.value)
    assert CUDA in str(err.value) and TRT in str(err.value)
    with pytest.raises(BundleError, match="not among the providers"):
        providers_from_args("cpu", ["cuda:device_id=0"])
    with pytest.raises(BundleError, match="PROVIDER:KEY=VALUE"):
        providers_from_args("cuda", ["cuda-device_id"])
    with pytest.raises(BundleError, match="listed twice"):
        providers_from_args("cuda,CUDAExecutionProvider", [])


# -- sessions on a real onnxruntime --------------------------------------------------------------


def cuda_bundle(tmp_path: Path, version: int = 1) -> Path:
    return make_mlp_bundle(tmp_path / "repo", version, providers=specs(CUDA, CPU)).path


def test_a_session_asked_for_cuda_serves_on_cpu_and_records_why(tmp_path: Path) -> None:
    model = OnnxModel(load_bundle(cuda_bundle(tmp_path)), RuntimeOptions(intra_op_threads=1))
    assert model.provider == CPU
    assert model.fallback is not None and model.fallback[0] == CUDA
    out = model.run({"x": X})["y"]
    assert out.shape == (2, 3)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (RuntimeOptions(require_provider=True), "require_provider = false"),
        (RuntimeOptions(device="cuda"), 'set device = "auto"'),
    ],
)
def test_strict_settings_refuse_instead_of_falling_back(
    tmp_path: Path, options: RuntimeOptions, needle: str
) -> None:
    with pytest.raises(ProviderUnavailableError) as err:
        OnnxModel(load_bundle(cuda_bundle(tmp_path)), options)
    text = str(err.value)
    assert CUDA in text and needle in text and "onnxruntime-gpu" in text


def test_require_provider_accepts_a_bundle_that_prefers_cpu(tmp_path: Path) -> None:
    plain = make_mlp_bundle(tmp_path / "repo", 1)
    assert OnnxModel(load_bundle(plain.path), RuntimeOptions(require_provider=True)).provider == CPU


def test_agent_settings_are_checked(tmp_path: Path) -> None:
    cfg = load_config(overrides={"model_device_ids": "big=1, small=0", "device_id": 2})
    assert model_device_ids(cfg) == (("big", 1), ("small", 0))
    with pytest.raises(InvalidRequestError, match="MODEL=DEVICE_ID"):
        load_config(overrides={"model_device_ids": "big:1"})
    with pytest.raises(InvalidRequestError, match="device_id must be >= 0"):
        load_config(overrides={"device_id": -1})
    with pytest.raises(InvalidRequestError, match=r"valid names: .*CUDAExecutionProvider"):
        load_config(overrides={"allowed_providers": "CUDAExecutionProvider,GPU"})


# -- real agent processes ------------------------------------------------------------------------


def infer(agent, version: str = "") -> str:
    client = agent.client()
    try:
        inp = grpcclient.InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        return client.infer("mlp", [inp], model_version=version).get_response().model_version
    finally:
        client.close()


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.process
def test_agent_serves_a_cuda_bundle_on_cpu_and_counts_the_fallback(
    tmp_path: Path, agent_factory
) -> None:
    repo = tmp_path / "models"
    make_mlp_bundle(repo, 1, providers=specs(CUDA, CPU))
    agent = agent_factory(repo, "--intra-op-threads", "1")
    agent.wait_model("mlp", timeout=60)
    assert infer(agent) == "1"
    text = agent.metrics()
    labels = {"model": "mlp", "version": "1"}
    assert metric(text, "modelfleet_provider_fallbacks_total", **labels, provider=CUDA) == 1
    assert metric(text, "modelfleet_execution_provider", **labels, provider=CPU) == 1
    assert agent_status(agent.admin_socket)["mlp"]["active_provider"] == CPU
    shown = agent.cli("status")
    assert "provider: v1 on CPUExecutionProvider" in shown.stdout, shown.stdout
    fallback_lines = [
        line for line in agent.logs().splitlines() if "cannot load, serving on" in line
    ]
    assert len(fallback_lines) == 1, fallback_lines
    assert CUDA in fallback_lines[0] and "onnxruntime-gpu" in fallback_lines[0]


@pytest.mark.process
def test_require_provider_fails_the_gate_and_the_previous_version_serves(
    tmp_path: Path, agent_factory
) -> None:
    repo = tmp_path / "models"
    staging = tmp_path / "staging"
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo, "--intra-op-threads", "1", "--require-provider", "on")
    agent.wait_model("mlp", timeout=60)
    v2 = make_mlp_bundle(staging, 2, seed=1, providers=specs(CUDA, CPU))
    os.rename(v2.path, repo / "mlp" / "2")

    def refused() -> bool:
        failed = agent_status(agent.admin_socket)["mlp"].get("failed", [])
        return any(f["version"] == "2" for f in failed)

    wait_for(refused, 60, "v2 refused")
    st = agent_status(agent.admin_socket)["mlp"]
    gate = next(f for f in st["failed"] if f["version"] == "2")
    assert gate["kind"] == "provider"
    assert CUDA in gate["reason"] and "require_provider" in gate["reason"]
    assert st["active_version"] == "1" and st["active_provider"] == CPU
    assert infer(agent) == "1"
    text = agent.metrics()
    assert metric(text, "modelfleet_gate_failures_total", model="mlp", version="2") == 1


@pytest.mark.process
def test_bundle_create_refuses_a_bogus_provider(tmp_path: Path) -> None:
    model = models.mlp(tmp_path / "m.onnx")
    np.savez(tmp_path / "s.npz", **mlp_samples())
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelfleet.agent.cli",
            "bundle",
            "create",
            str(model),
            "--name",
            "mlp",
            "--version",
            "1",
            "--samples",
            str(tmp_path / "s.npz"),
            "--out",
            str(tmp_path / "repo"),
            "--providers",
            "cuda,CudaGpuExecutionProvider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    assert "CudaGpuExecutionProvider" in run.stderr and "CUDAExecutionProvider" in run.stderr
    assert not (tmp_path / "repo" / "mlp" / "1").exists()
