"""The model bundle: the unit that is signed, shipped, verified, cached and served.

A bundle is a directory ``<name>/<version>/`` holding

- ``model.onnx``: the model,
- ``health.npz``: health-check samples (``input:<name>``) and expected outputs (``output:<name>``),
- ``reference.json`` (optional): reference statistics of the inputs and outputs, for drift
  (``kernel.drift``),
- ``manifest.json``: name, version, signature, execution hints, health-check settings, the
  SHA-256 and size of the files above, and provenance.

The format is documented in docs/bundle-format.md. This module is shared by hub, agent and batch,
so it depends only on numpy, onnx (when creating) and the standard library.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelfleet.kernel.atomic import fsync_dir as _fsync_dir
from modelfleet.kernel.datatypes import DATATYPE_BY_ONNX_ELEM, NUMPY_BY_DATATYPE
from modelfleet.kernel.drift import DEFAULT_BINS, DEFAULT_TOP_K, Reference, parse_reference
from modelfleet.kernel.errors import BundleError, BundleExistsError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
HEALTH_FILE = "health.npz"
REFERENCE_FILE = "reference.json"
# The packed bundle's leaf name in the TUF repository (see bundle_target_path).
TARGET_FILE_NAME = "bundle.tar"

# Model names become directory names, topic segments and metric labels: keep them boring.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
NAME_RULE = "1-128 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit"
# Versions travel as protobuf int64 and are stored as SQLite INTEGER (signed 64 bits).
MAX_VERSION = 2**63 - 1
VERSION_RANGE = f"1..{MAX_VERSION}"


def bundle_target_path(name: str, version: int) -> str:
    """The TUF target path of a bundle, ``<name>/<version>/bundle.tar``.

    A contract between the hub, which signs bundles under this path, and the agent, which looks
    them up by it: a change here is a change of the wire format.
    """
    return f"{name}/{version}/{TARGET_FILE_NAME}"


DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
DEFAULT_WARMUP_RUNS = 20
DEFAULT_LATENCY_BUDGET_MS = 1000.0
DEFAULT_MAX_BATCH_SIZE = 32


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    # Full shape including the batch dimension; -1 marks a dynamic dimension.
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class HealthSpec:
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    latency_budget_ms: float = DEFAULT_LATENCY_BUDGET_MS
    warmup_runs: int = DEFAULT_WARMUP_RUNS
    sha256: str = ""
    size: int = 0


@dataclass(frozen=True)
class FileSpec:
    """An optional bundle file the manifest lists with its hash (today: reference.json)."""

    sha256: str
    size: int


# An execution provider onnxruntime names, e.g. CUDAExecutionProvider. A manifest may name one this
# build of onnxruntime does not know (a newer one): the agent then treats it as unavailable.
PROVIDER_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,63}ExecutionProvider\Z")
CPU_PROVIDER = "CPUExecutionProvider"
# Provider options whose values are files, folders, libraries or raw addresses (TensorRT's
# trt_extra_plugin_lib_paths and trt_engine_cache_path, CUDA's gpu_external_alloc and
# user_compute_stream, OpenVINO's cache_dir, TensorRT's trt_engine_cache_prefix, a file name
# that "../" would take out of its folder, ...): through them a bundle would pick which code an
# agent loads, where it writes, or which address it calls. A bundle's signer decides what the
# model computes, not that; such settings belong to the node's operator, so a manifest naming
# one is refused, whichever provider it is for. Where TensorRT writes its caches is set by the
# agent itself (kernel/runtime.py, confine_caches).
UNSAFE_OPTION_WORDS = (
    "path",
    "dir",
    "folder",
    "file",
    "lib",
    "plugin",
    "external",
    "alloc",
    "user_compute_stream",
    "bytestream",
    "dump",
    "table_name",
    "config",
    "context",
    "prefix",
)


def check_provider_option(provider: str, key: str, where: str) -> None:
    lowered = key.lower()
    word = next((w for w in UNSAFE_OPTION_WORDS if w in lowered), None)
    if word is not None:
        raise BundleError(
            f"{where}: {provider} option {key!r} names a file, folder, library or address "
            f"(it contains {word!r}); a bundle may not set such options, since they would let it "
            "choose what the agent loads or writes. Leave it out of the bundle"
        )


@dataclass(frozen=True)
class ProviderSpec:
    """One preferred execution provider and its onnxruntime provider options."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options)}


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_sha256: str
    model_size: int
    health: HealthSpec
    # 0: the model has no batch dimension; N > 0: dimension 0 is the batch, at most N rows.
    max_batch_size: int = 0
    # Dynamic batching hint: how long a request may wait for others to join its batch.
    max_queue_delay_us: int = 0
    feature_names: tuple[str, ...] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    # reference.json, when the bundle carries reference statistics.
    reference: FileSpec | None = None
    # Class labels per output (index -> label), for the classification extension. In the
    # manifest itself, so they are signed with it and need no file of their own.
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Execution providers in order of preference (empty: the agent's default choice).
    providers: tuple[ProviderSpec, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "model": {"path": MODEL_FILE, "sha256": self.model_sha256, "size": self.model_size},
            "signature": {
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
            },
            "execution": {
                "max_batch_size": self.max_batch_size,
                "max_queue_delay_us": self.max_queue_delay_us,
            },
            "health": {"path": HEALTH_FILE, **asdict(self.health)},
            "feature_names": list(self.feature_names),
            "provenance": dict(self.provenance),
        }
        # Only when present, so a bundle without them keeps the manifest (and hash) it always had.
        if self.providers:
            out["execution"]["providers"] = [p.to_json() for p in self.providers]
        if self.reference is not None:
            out["reference"] = {
                "path": REFERENCE_FILE,
                "sha256": self.reference.sha256,
                "size": self.reference.size,
            }
        if self.labels:
            out["labels"] = {k: list(v) for k, v in self.labels.items()}
        return out

    def files(self) -> tuple[str, ...]:
        """The bundle's files, in archive order."""
        return BUNDLE_FILES + ((REFERENCE_FILE,) if self.reference is not None else ())

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass(frozen=True)
class HealthSamples:
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    def health_samples(self) -> HealthSamples:
        return _read_health(self.path / HEALTH_FILE)

    def reference(self) -> Reference | None:
        """The reference statistics, or None when the bundle has none (checked by load_bundle;
        read again here, so a file changed since is caught by its hash)."""
        if self.manifest.reference is None:
            return None
        return _read_reference(self.path, self.manifest)


# ---------------------------------------------------------------------------------------------
# Reading and verifying


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _require(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise BundleError(f"manifest: missing key {where}{key}")
    value = obj[key]
    # bool is an int in Python; a manifest saying "version": true is still wrong.
    if isinstance(value, bool) and kind is not bool:
        raise BundleError(f"manifest: {where}{key} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise BundleError(f"manifest: {where}{key} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _parse_tensors(raw: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise BundleError(f"manifest: {where} must be a non-empty list")
    specs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise BundleError(f"manifest: {where}[{i}] must be an object")
        name = _require(item, "name", str, f"{where}[{i}].")
        datatype = _require(item, "datatype", str, f"{where}[{i}].")
        if datatype not in NUMPY_BY_DATATYPE:
            raise BundleError(f"manifest: {where}[{i}] ({name}) has unknown datatype {datatype!r}")
        shape = _require(item, "shape", list, f"{where}[{i}].")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape):
            raise BundleError(f"manifest: {where}[{i}] ({name}) has invalid shape {shape!r}")
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BundleError(f"manifest: {where} has duplicate tensor names {names}")
    return tuple(specs)


def parse_manifest(data: Mapping[str, Any]) -> Manifest:
    """Validate a decoded manifest; every problem names the key that is wrong."""
    if not isinstance(data, Mapping):
        raise BundleError("manifest: top level must be a JSON object")
    fmt = _require(data, "format", int, "")
    if fmt != FORMAT_VERSION:
        raise BundleError(f"manifest: unsupported format {fmt} (this build reads {FORMAT_VERSION})")
    name = _require(data, "name", str, "")
    if not NAME_RE.match(name):
        raise BundleError(f"manifest: invalid model name {name!r}: use {NAME_RULE}")
    version = _require(data, "version", int, "")
    if not 1 <= version <= MAX_VERSION:
        raise BundleError(f"manifest: version {version} is outside {VERSION_RANGE}")
    model = _require(data, "model", dict, "")
    sig = _require(data, "signature", dict, "")
    execution = _require(data, "execution", dict, "")
    health = _require(data, "health", dict, "")
    max_batch = _require(execution, "max_batch_size", int, "execution.")
    delay = _require(execution, "max_queue_delay_us", int, "execution.")
    if max_batch < 0 or delay < 0:
        raise BundleError("manifest: execution.max_batch_size and max_queue_delay_us must be >= 0")
    providers = _parse_providers(execution.get("providers", []))
    health_spec = HealthSpec(
        rtol=float(_require(health, "rtol", (int, float), "health.")),
        atol=float(_require(health, "atol", (int, float), "health.")),
        latency_budget_ms=float(_require(health, "latency_budget_ms", (int, float), "health.")),
        warmup_runs=_require(health, "warmup_runs", int, "health."),
        sha256=_require(health, "sha256", str, "health."),
        size=_require(health, "size", int, "health."),
    )
    if health_spec.warmup_runs < 1:
        raise BundleError("manifest: health.warmup_runs must be >= 1")
    feature_names = data.get("feature_names", [])
    if not isinstance(feature_names, list) or not all(isinstance(f, str) for f in feature_names):
        raise BundleError("manifest: feature_names must be a list of strings")
    provenance = data.get("provenance", {})
    if not isinstance(provenance, dict):
        raise BundleError("manifest: provenance must be an object")
    reference = None
    if "reference" in data:
        ref = _require(data, "reference", dict, "")
        reference = FileSpec(
            sha256=_require(ref, "sha256", str, "reference."),
            size=_require(ref, "size", int, "reference."),
        )
    outputs = _parse_tensors(sig.get("outputs"), "signature.outputs")
    labels = _parse_labels(data.get("labels", {}), outputs)
    return Manifest(
        name=name,
        version=version,
        inputs=_parse_tensors(sig.get("inputs"), "signature.inputs"),
        outputs=outputs,
        model_sha256=_require(model, "sha256", str, "model."),
        model_size=_require(model, "size", int, "model."),
        health=health_spec,
        max_batch_size=max_batch,
        max_queue_delay_us=delay,
        feature_names=tuple(feature_names),
        provenance=provenance,
        reference=reference,
        labels=labels,
        providers=providers,
    )


def _parse_labels(raw: Any, outputs: tuple[TensorSpec, ...]) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise BundleError("manifest: labels must be an object (output name -> list of labels)")
    names = {t.name for t in outputs}
    out: dict[str, tuple[str, ...]] = {}
    for key, value in raw.items():
        if key not in names:
            raise BundleError(
                f"manifest: labels.{key}: the model has no output {key!r} "
                f"(outputs: {', '.join(sorted(names))})"
            )
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BundleError(f"manifest: labels.{key} must be a list of strings")
        out[key] = tuple(value)
    return out


def read_labels_file(path: Path | str) -> tuple[str, ...]:
    """One label per line, line N (from 0) naming class index N, as Triton's label files do."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read labels file {path}: {exc}") from None
    labels = text.splitlines()
    if not labels:
        raise BundleError(f"labels file {path} is empty: write one label per line")
    return tuple(labels)


def _parse_providers(raw: Any) -> tuple[ProviderSpec, ...]:
    where = "manifest: execution.providers"
    if not isinstance(raw, list):
        raise BundleError(f"{where} must be a list")
    out: list[ProviderSpec] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise BundleError(f"{where}[{i}] must be an object with name and options")
        name = _require(item, "name", str, f"execution.providers[{i}].")
        if not PROVIDER_NAME_RE.match(name):
            raise BundleError(f"{where}[{i}]: {name!r} is not an execution provider name")
        options = item.get("options", {})
        if not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in options.items()
        ):
            raise BundleError(f"{where}[{i}].options must map strings to strings")
        for key in options:
            check_provider_option(name, key, f"{where}[{i}].options")
        out.append(ProviderSpec(name, tuple(sorted(options.items()))))
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise BundleError(f"{where} lists a provider twice: {names}")
    return tuple(out)


def provider_specs(
    names: list[str] | tuple[str, ...],
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[ProviderSpec, ...]:
    """Provider preferences from names (full, or short: cuda, tensorrt, cpu) and options.

    Every name must be one onnxruntime knows (any build: ``get_all_providers``), so a typo is
    refused here, where the bundle is made, instead of falling back to CPU on every node.
    """
    import onnxruntime as ort

    known = list(ort.get_all_providers())
    short = {p.removesuffix("ExecutionProvider").lower(): p for p in known}
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        full = name if name in known else short.get(name.lower())
        if full is None:
            raise BundleError(
                f"unknown execution provider {name!r}; valid names (or their short forms "
                f"cuda, tensorrt, cpu, ...): {', '.join(known)}"
            )
        if full in out:
            raise BundleError(f"execution provider {full} is listed twice")
        out.append(full)
    opts: dict[str, dict[str, str]] = {}
    for raw_name, values in (options or {}).items():
        full = short.get(raw_name.lower(), raw_name)
        if full not in out:
            raise BundleError(
                f"options given for {raw_name!r}, which is not among the providers "
                f"({', '.join(out) or 'none'})"
            )
        for key in values:
            check_provider_option(full, str(key), "provider options")
        opts[full] = {str(k): str(v) for k, v in values.items()}
    return tuple(ProviderSpec(n, tuple(sorted(opts.get(n, {}).items()))) for n in out)


def providers_from_args(providers: str, options: list[str]) -> tuple[ProviderSpec, ...]:
    """``--providers A,B,C`` and ``--provider-option PROVIDER:KEY=VALUE`` (repeated)."""
    names = [n for n in (p.strip() for p in providers.split(",")) if n]
    opts: dict[str, dict[str, str]] = {}
    for item in options:
        provider, sep, pair = item.partition(":")
        key, eq, value = pair.partition("=")
        if not sep or not eq or not provider.strip() or not key.strip():
            raise BundleError(
                f"--provider-option takes PROVIDER:KEY=VALUE (e.g. "
                f"CUDAExecutionProvider:cudnn_conv_algo_search=HEURISTIC), not {item!r}"
            )
        opts.setdefault(provider.strip(), {})[key.strip()] = value
    if opts and not names:
        raise BundleError("--provider-option needs --providers naming that provider")
    return provider_specs(names, opts) if names else ()


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path}: manifest is missing") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: manifest is not valid JSON: {exc}") from None
    return parse_manifest(data)


def load_bundle(bundle_dir: Path | str, *, verify_hashes: bool = True) -> Bundle:
    """Read and check a bundle directory. Raises :class:`BundleError` naming what is wrong."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    checks = [
        (MODEL_FILE, manifest.model_sha256, manifest.model_size),
        (HEALTH_FILE, manifest.health.sha256, manifest.health.size),
    ]
    if manifest.reference is not None:
        checks.append((REFERENCE_FILE, manifest.reference.sha256, manifest.reference.size))
    elif (bundle_dir / REFERENCE_FILE).exists():
        # Unsigned statistics would be trusted by whoever reads them: refuse rather than ignore.
        raise BundleError(
            f"{bundle_dir}: {REFERENCE_FILE} is there but the manifest does not list it; "
            "rebuild the bundle with --reference"
        )
    for filename, want_sha, want_size in checks:
        path = bundle_dir / filename
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BundleError(f"{bundle_dir}: {filename} is missing") from None
        if size != want_size:
            raise BundleError(
                f"{bundle_dir}: {filename} is {size} bytes, manifest says {want_size}"
            )
        if verify_hashes:
            got_sha, _ = sha256_file(path)
            if got_sha != want_sha:
                raise BundleError(
                    f"{bundle_dir}: {filename} sha256 {got_sha[:16]}... does not match the "
                    f"manifest's {want_sha[:16]}..."
                )
    if manifest.reference is not None:
        _read_reference(bundle_dir, manifest)
    return Bundle(bundle_dir, manifest)


def _read_reference(bundle_dir: Path, manifest: Manifest) -> Reference:
    from modelfleet.kernel.reference import check_reference

    path = bundle_dir / REFERENCE_FILE
    assert manifest.reference is not None
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: {REFERENCE_FILE} is missing") from None
    if hashlib.sha256(raw).hexdigest() != manifest.reference.sha256:
        raise BundleError(
            f"{bundle_dir}: {REFERENCE_FILE} sha256 does not match the manifest's "
            f"{manifest.reference.sha256[:16]}..."
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle_dir}: {REFERENCE_FILE} is not valid JSON: {exc}") from None
    try:
        reference = parse_reference(data)
    except BundleError as exc:
        raise BundleError(f"{bundle_dir}: {exc}") from None
    check_reference(reference, manifest.inputs, manifest.outputs, f"{bundle_dir}")
    return reference


def _read_health(path: Path) -> HealthSamples:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: cannot read health samples: {exc}") from None
    inputs = {k[len("input:") :]: v for k, v in arrays.items() if k.startswith("input:")}
    expected = {k[len("output:") :]: v for k, v in arrays.items() if k.startswith("output:")}
    return HealthSamples(_unstring(inputs), _unstring(expected))


def _unstring(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Strings are stored as fixed-width unicode (npz cannot hold object arrays without pickle).
    return {k: (v.astype(object) if v.dtype.kind == "U" else v) for k, v in arrays.items()}


# ---------------------------------------------------------------------------------------------
# Creating


def signature_from_onnx(
    model_bytes: bytes,
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of an ONNX model, as OIP tensor specs (initializers excluded)."""
    import onnx

    try:
        model = onnx.load_from_string(model_bytes)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise BundleError(f"not a valid ONNX model: {exc}") from None
    initializers = {init.name for init in model.graph.initializer}

    def spec(value_info: Any) -> TensorSpec:
        ttype = value_info.type.tensor_type
        datatype = DATATYPE_BY_ONNX_ELEM.get(ttype.elem_type)
        if datatype is None:
            raise BundleError(
                f"tensor {value_info.name!r} has ONNX element type {ttype.elem_type}, "
                "which the Open Inference Protocol cannot carry"
            )
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim)
        return TensorSpec(value_info.name, datatype, dims)

    inputs = tuple(spec(i) for i in model.graph.input if i.name not in initializers)
    outputs = tuple(spec(o) for o in model.graph.output)
    return inputs, outputs


def synthetic_samples(
    model_path: Path | str, rows: int = 4, seed: int = 0
) -> dict[str, np.ndarray]:
    """Deterministic random health samples for a model published without --samples.

    They still exercise the gate's shape, dtype, finiteness, determinism and latency checks;
    real samples with golden outputs are better and should be used for production models.
    """
    inputs, _ = signature_from_onnx(Path(model_path).read_bytes())
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = tuple(
            rows if (i == 0 and d == -1) else (1 if d == -1 else d)
            for i, d in enumerate(spec.shape)
        )
        dtype = NUMPY_BY_DATATYPE[spec.datatype]
        if spec.datatype == "BYTES":
            out[spec.name] = np.full(shape, "sample", dtype=object)
        elif spec.datatype == "BOOL":
            out[spec.name] = rng.integers(0, 2, shape).astype(bool)
        elif dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[spec.name] = rng.integers(0, 10, shape).astype(dtype)
    return out


def _default_max_batch(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> int:
    batchable = all(t.shape and t.shape[0] == -1 for t in (*inputs, *outputs))
    return DEFAULT_MAX_BATCH_SIZE if batchable else 0


def _write_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    stored = {k: (_to_unicode(v) if v.dtype.kind in ("O", "S") else v) for k, v in arrays.items()}
    np.savez(buf, **stored)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    return buf.getvalue()


def _to_unicode(arr: np.ndarray) -> np.ndarray:
    # npz cannot hold object arrays without pickle; strings are stored as unicode, bytes decoded
    # as UTF-8 (with surrogate escapes so arbitrary bytes survive the round trip).
    def text(v: object) -> str:
        return v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v)

    return np.vectorize(text, otypes=[str])(arr) if arr.size else arr.astype(str)


def _check_samples(
    samples: Mapping[str, np.ndarray], inputs: tuple[TensorSpec, ...]
) -> dict[str, np.ndarray]:
    checked: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name not in samples:
            raise BundleError(
                f"samples: no array for model input {spec.name!r} "
                f"(have {sorted(samples) or 'none'})"
            )
        arr = np.asarray(samples[spec.name])
        want = NUMPY_BY_DATATYPE[spec.datatype]
        if spec.datatype == "BYTES":
            if arr.dtype.kind not in ("U", "S", "O"):
                raise BundleError(f"samples: {spec.name!r} must hold strings, got {arr.dtype}")
            arr = arr.astype(object)
        elif arr.dtype != want:
            raise BundleError(
                f"samples: {spec.name!r} has dtype {arr.dtype}, the model expects "
                f"{spec.datatype} ({want})"
            )
        if len(arr.shape) != len(spec.shape) or any(
            d != -1 and d != a for d, a in zip(spec.shape, arr.shape, strict=False)
        ):
            raise BundleError(
                f"samples: {spec.name!r} has shape {list(arr.shape)}, "
                f"the model expects {list(spec.shape)}"
            )
        checked[spec.name] = arr
    extra = set(samples) - {s.name for s in inputs}
    if extra:
        raise BundleError(f"samples: arrays {sorted(extra)} match no model input")
    return checked


def create_bundle(
    model_path: Path | str,
    *,
    name: str,
    version: int,
    samples: Mapping[str, np.ndarray],
    out_dir: Path | str,
    expected: Mapping[str, np.ndarray] | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    latency_budget_ms: float = DEFAULT_LATENCY_BUDGET_MS,
    warmup_runs: int = DEFAULT_WARMUP_RUNS,
    max_batch_size: int | None = None,
    max_queue_delay_us: int = 0,
    feature_names: tuple[str, ...] = (),
    provenance: Mapping[str, Any] | None = None,
    reference: Reference | Path | str | None = None,
    reference_bins: int = DEFAULT_BINS,
    reference_top_k: int = DEFAULT_TOP_K,
    labels: Mapping[str, tuple[str, ...]] | None = None,
    providers: tuple[ProviderSpec, ...] = (),
) -> Bundle:
    """Build ``out_dir/name/version/`` atomically and return it.

    Expected outputs are computed with onnxruntime on the CPU unless given (for example golden
    outputs from a reference implementation). ``reference`` is a Parquet dataset or a
    reference.json file (``kernel.reference``), or statistics already computed; it is stored
    as reference.json, listed in the manifest with its hash. ``labels`` maps output names to
    class labels (index -> label) for the classification extension; they go in the manifest.
    ``providers`` (see :func:`provider_specs`) are the execution providers the bundle prefers,
    best first.
    """
    if not NAME_RE.match(name):
        raise BundleError(f"invalid model name {name!r}: use {NAME_RULE}")
    if not 1 <= version <= MAX_VERSION:
        raise BundleError(f"version {version} is outside {VERSION_RANGE}")
    if warmup_runs < 1:
        raise BundleError("warmup_runs must be >= 1")
    for label, value in (
        ("rtol", rtol),
        ("atol", atol),
        ("latency_budget_ms", latency_budget_ms),
        ("max_queue_delay_us", max_queue_delay_us),
        ("max_batch_size", max_batch_size or 0),
    ):
        if value < 0:
            raise BundleError(f"{label} must be >= 0, got {value}")
    model_path = Path(model_path)
    try:
        model_bytes = model_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read model {model_path}: {exc}") from None
    inputs, outputs = signature_from_onnx(model_bytes)
    if max_batch_size is None:
        max_batch_size = _default_max_batch(inputs, outputs)
    if max_batch_size > 0:
        for t in (*inputs, *outputs):
            if not t.shape or t.shape[0] not in (-1, max_batch_size):
                raise BundleError(
                    f"max_batch_size {max_batch_size} needs a dynamic first dimension, "
                    f"but {t.name!r} has shape {list(t.shape)}"
                )
    checked = _check_samples(samples, inputs)
    out_names = {o.name for o in outputs}
    for key in labels or {}:
        if key not in out_names:
            raise BundleError(
                f"labels given for {key!r}, but the model has no such output "
                f"(outputs: {', '.join(sorted(out_names))})"
            )

    if expected is None:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
            results = session.run([o.name for o in outputs], checked)
        except Exception as exc:
            raise BundleError(f"onnxruntime cannot run the model on the samples: {exc}") from None
        expected = dict(zip([o.name for o in outputs], results, strict=True))
    else:
        missing = [o.name for o in outputs if o.name not in expected]
        if missing:
            raise BundleError(f"expected outputs: no array for model output(s) {missing}")
    reference_bytes = None
    if reference is not None:
        from modelfleet.kernel.reference import check_reference, reference_from_file

        if isinstance(reference, Reference):
            check_reference(reference, inputs, outputs, "reference")
        else:
            reference = reference_from_file(
                reference,
                model_bytes=model_bytes,
                inputs=inputs,
                outputs=outputs,
                feature_names=feature_names,
                bins=reference_bins,
                top_k=reference_top_k,
            )
        text = json.dumps(reference.to_json(), indent=1, allow_nan=False) + "\n"
        # What is written is what a reader will accept: parse it back before signing it.
        parse_reference(json.loads(text))
        reference_bytes = text.encode()
    health_arrays = {f"input:{k}": v for k, v in checked.items()}
    health_arrays.update({f"output:{k}": np.asarray(v) for k, v in expected.items()})
    health_bytes = _write_npz(health_arrays)

    prov: dict[str, Any] = {
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "created_by": f"{_user()}@{socket.gethostname()}",
        "source_file": model_path.name,
        "tool": "modelfleet",
    }
    prov.update(provenance or {})
    manifest = Manifest(
        name=name,
        version=version,
        inputs=inputs,
        outputs=outputs,
        model_sha256=hashlib.sha256(model_bytes).hexdigest(),
        model_size=len(model_bytes),
        health=HealthSpec(
            rtol=rtol,
            atol=atol,
            latency_budget_ms=latency_budget_ms,
            warmup_runs=warmup_runs,
            sha256=hashlib.sha256(health_bytes).hexdigest(),
            size=len(health_bytes),
        ),
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        feature_names=tuple(feature_names),
        provenance=prov,
        reference=(
            FileSpec(hashlib.sha256(reference_bytes).hexdigest(), len(reference_bytes))
            if reference_bytes is not None
            else None
        ),
        labels={k: tuple(v) for k, v in (labels or {}).items()},
        providers=tuple(providers),
    )
    files = {
        MODEL_FILE: model_bytes,
        HEALTH_FILE: health_bytes,
        MANIFEST_FILE: (json.dumps(manifest.to_json(), indent=2) + "\n").encode(),
    }
    if reference_bytes is not None:
        files[REFERENCE_FILE] = reference_bytes
    final = write_bundle_dir(Path(out_dir) / name, str(version), files)
    return Bundle(final, manifest)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _publish_dir(tmp: Path, final: Path) -> None:
    """Rename a fully written (fsynced) temporary directory into place, durably.

    rename() onto an existing non-empty directory fails, so a concurrent writer of the same
    version loses cleanly instead of overwriting: bundle versions are immutable.
    """
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, final)
    except OSError:
        raise BundleExistsError(f"{final} already exists; bundle versions are immutable") from None
    _fsync_dir(final.parent)


def write_bundle_dir(parent: Path, leaf: str, files: Mapping[str, bytes]) -> Path:
    """Write files into ``parent/leaf`` so that readers see all of it or nothing.

    Files are written and fsynced under a hidden temporary name in the same directory, which is
    then renamed into place; a watcher never sees a half-written bundle.
    """
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / leaf
    if final.exists():
        raise BundleExistsError(f"{final} already exists; bundle versions are immutable")
    tmp = Path(tempfile.mkdtemp(prefix=f".{leaf}.tmp-", dir=parent))
    try:
        for filename, data in files.items():
            with open(tmp / filename, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _publish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Shipping: one uncompressed tar per bundle (the TUF target). ONNX weights barely compress, and
# an uncompressed archive can be streamed, resumed at any byte offset and hashed as it arrives.

BUNDLE_FILES = (MANIFEST_FILE, MODEL_FILE, HEALTH_FILE)
# Files a bundle may carry besides those, packed after them when the manifest lists them.
OPTIONAL_BUNDLE_FILES = (REFERENCE_FILE,)


def pack_bundle(bundle_dir: Path | str, out_path: Path | str) -> tuple[str, int]:
    """Write a deterministic tar of the bundle; return its (sha256, size).

    Deterministic (fixed order, mtime, owner, mode) so the same bundle always has the same hash.
    """
    import tarfile

    bundle_dir, out_path = Path(bundle_dir), Path(out_path)
    bundle = load_bundle(bundle_dir)  # never ship something the agent would refuse
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for filename in bundle.manifest.files():
            info = tar.gettarinfo(str(bundle_dir / filename), arcname=filename)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o644
            with open(bundle_dir / filename, "rb") as fh:
                tar.addfile(info, fh)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out_path)
    return sha256_file(out_path)


def unpack_bundle(
    archive: Path | str,
    parent: Path | str,
    *,
    expect: tuple[str, int] | None = None,
    verify_hashes: bool = True,
) -> Bundle:
    """Extract a bundle archive into ``parent/<version>`` atomically and verify it.

    Only the three bundle files are accepted, as regular files at the top level: no links, no
    paths, no devices, nothing else. ``expect`` is the (name, version) the archive was fetched as.
    """
    from modelfleet.kernel.bundle_stream import StreamUnpacker

    archive, parent = Path(archive), Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    unpacker = StreamUnpacker(
        Path(tempfile.mkdtemp(prefix=".unpack-", dir=parent)), where=str(archive)
    )
    try:
        with open(archive, "rb") as fh:
            while block := fh.read(1 << 20):
                unpacker.write(block)
        files = unpacker.finish()
        return publish_unpacked(
            files, parent, expect=expect, verify_hashes=verify_hashes, where=str(archive)
        )
    finally:
        unpacker.discard()


def publish_unpacked(
    files: Path,
    parent: Path,
    *,
    expect: tuple[str, int] | None = None,
    verify_hashes: bool = True,
    where: str = "bundle",
) -> Bundle:
    """Check the unpacked bundle files in ``files`` and rename them to ``parent/<version>``.

    ``expect`` is the (name, version) the archive was fetched as; a manifest naming another
    model or version is refused. Raises ``BundleExistsError`` when that version is there already.
    """
    bundle = load_bundle(files, verify_hashes=verify_hashes)
    if expect is not None and (bundle.name, bundle.version) != expect:
        raise BundleError(
            f"{where}: manifest says {bundle.name!r} version {bundle.version}, "
            f"expected {expect[0]!r} version {expect[1]}"
        )
    final = parent / str(bundle.version)
    _publish_dir(files, final)
    return Bundle(final, bundle.manifest)
